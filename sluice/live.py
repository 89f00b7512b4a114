"""What ``sluice demo`` shows while it runs: progress read from the run's files and Redis, drawn
as a rich live view or as plain log lines (``--no-live``).

The demo's orchestration (``sluice.demo``) owns the processes; this module only reads:
``RUN_DIR/metrics.jsonl`` (appended by the trainer), the VersionManager snapshot, the buffer
stats and the worker metrics hashes in Redis. Each sample is also appended to
``RUN_DIR/progress.jsonl`` (gate counters over time, for the report's throughput plot).

Staleness is shown two ways, kept apart: *trained* (``staleness_max_trained`` of the steps, the
groups that reached the optimizer) and *arrived* (``staleness_max`` of the steps, every group
the trainer received, the dropped ones included).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer import keys
from sluice import report
from sluice.config import SluiceConfig
from sluice.supervisor import Supervisor

log = logging.getLogger("sluice.demo")

# The processes of a demo run, in the order the view lists them.
CHILD_ORDER = ("server", "trainer", "worker")


@dataclass
class Progress:
    """What the live view shows; updated from the run's files and Redis."""

    started: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)
    snap: dict[str, Any] | None = None
    buffer: dict[str, int] | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    gen_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20))
    _offset: int = 0
    _partial: str = ""

    def read_metrics(self, path: Path) -> list[dict[str, Any]]:
        """Step rows appended to ``metrics.jsonl`` since the last call (a torn last line waits;
        event lines, such as eval results, are skipped)."""
        try:
            with path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" not in obj:  # steps only, not eval events
                new.append(obj)
        self.rows.extend(new)
        return new

    def last(self, key: str) -> Any:
        for r in reversed(self.rows):
            if r.get(key) is not None:
                return r[key]
        return None

    def gen_rate(self) -> float | None:
        if len(self.gen_window) < 2:
            return None
        (t0, n0), (t1, n1) = self.gen_window[0], self.gen_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def train_rate(self, window: int = 5) -> float | None:
        pts = [r for r in self.rows if isinstance(r.get("time"), int | float)][-(window + 1) :]
        if len(pts) < 2 or pts[-1]["time"] <= pts[0]["time"]:
            return None
        groups = sum(r.get("groups", 0) or 0 for r in pts[1:])
        return float(groups / (pts[-1]["time"] - pts[0]["time"]))

    def idle_s(self) -> float:
        seen: dict[Any, float] = {}
        for r in self.rows:
            seen[r.get("step")] = float(r.get("idle_s") or 0.0)
        return sum(seen.values())

    def _max_int(self, key: str) -> int | None:
        vals = [r[key] for r in self.rows if isinstance(r.get(key), int)]
        return max(vals) if vals else None

    def max_staleness(self) -> int | None:
        """The largest staleness among the groups that arrived at the trainer."""
        return self._max_int("staleness_max")

    def max_staleness_trained(self) -> int | None:
        """The largest staleness among the groups that reached the optimizer (None until a step
        reports one)."""
        return self._max_int("staleness_max_trained")

    def dropped(self) -> int:
        return int(self.last("dropped_total") or 0)

    def gate_blocked_s(self) -> float:
        return sum(float(w.get("gate_blocked_s") or 0.0) for w in self.workers)

    def server_util(self) -> float | None:
        utils = [
            float(s["utilisation"])
            for w in self.workers
            for s in (w.get("servers") or [])
            if isinstance(s, dict) and isinstance(s.get("utilisation"), int | float)
        ]
        return max(utils) if utils else None


def maybe_json(text: str) -> Any:
    """``text`` parsed as JSON, or ``text`` itself when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def worker_metrics(client: Any, run: str) -> list[dict[str, Any]]:
    """Every worker's metrics hash of ``run``, values parsed as JSON where they are."""
    out = []
    async for k in client.scan_iter(match=keys.worker_metrics_glob(run)):
        raw = await client.hgetall(k)
        out.append({kk.decode(): maybe_json(v.decode()) for kk, v in raw.items()})
    return out


async def sample(p: Progress, run_dir: Path, run: str, client: Any, vm: Any, buf: Any) -> None:
    """Read what is new (metrics rows, gate snapshot, buffer stats, worker metrics) into ``p``
    and append the gate counters to ``RUN_DIR/progress.jsonl``."""
    p.read_metrics(run_dir / "metrics.jsonl")
    try:
        snap = (await vm.snapshot()).as_dict()
    except Exception as e:  # a snapshot is informative only; say why it is missing
        log.debug("snapshot failed: %s", e)
        return
    p.snap = snap
    p.buffer = (await buf.stats()).as_dict()
    now = time.time()
    p.gen_window.append((now, snap["finished"] + snap["rejected"]))
    p.workers = await worker_metrics(client, run)
    row = {
        "time": now,
        **{
            k: snap[k]
            for k in ("version", "admitted", "finished", "rejected", "inflight", "capacity")
        },
        "buffer_length": p.buffer["length"],
        "buffer_pending": p.buffer["pending"],
        "gate_blocked_s": p.gate_blocked_s(),
    }
    with (run_dir / "progress.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def fmt(x: Any, nd: int = 3, unit: str = "") -> str:
    """``x`` for a human: floats to ``nd`` places, None as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def _queued(buf: dict[str, int]) -> int | None:
    """Groups in the stream no trainer has read yet."""
    if "length" not in buf or "pending" not in buf:
        return None
    return max(0, buf["length"] - buf["pending"])


def staleness_text(p: Progress, eta: Any) -> str:
    """Trained and arrived staleness apart (``sluice.report.staleness_text``)."""
    return report.staleness_text(p.max_staleness_trained(), p.max_staleness(), eta, fmt)


def plain_line(p: Progress, cfg: SluiceConfig) -> str:
    """One log line of progress (``--no-live``)."""
    snap = p.snap or {}
    buf = p.buffer or {}
    elapsed = time.monotonic() - p.started
    first = p.rows[0].get("reward_mean") if p.rows else None
    eta = snap.get("eta", cfg.staleness.eta)
    return (
        f"[{elapsed:6.1f}s] step {fmt(p.last('step'))}/{cfg.trainer.max_steps} "
        f"v{fmt(snap.get('version'))} reward {fmt(p.last('reward_mean'))} (start {fmt(first)}) "
        f"staleness {staleness_text(p, eta)} "
        f"dropped {p.dropped()} | waste {report.waste_text(p.rows[-1] if p.rows else None)} | gen {fmt(p.gen_rate(), 1)} g/s train {fmt(p.train_rate(), 1)} "
        f"g/s | buffer {fmt(_queued(buf))} queued, {fmt(buf.get('pending'))} unacked | waiting: "
        f"trainer {p.idle_s():.1f}s, worker gate {p.gate_blocked_s():.1f}s"
    )


def _summary_table(p: Progress, cfg: SluiceConfig, engine: str) -> Any:
    from rich.table import Table

    snap = p.snap or {}
    buf = p.buffer or {}
    elapsed = time.monotonic() - p.started
    first = p.rows[0].get("reward_mean") if p.rows else None
    t = Table(
        title=f"sluice demo: run {cfg.run.name}, task {cfg.task.name}, engine {engine}, "
        f"{elapsed:.0f}s",
        show_header=False,
        title_justify="left",
    )
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row(
        "step / version",
        f"{fmt(p.last('step'))} / {cfg.trainer.max_steps}   v{fmt(snap.get('version'))}",
    )
    t.add_row(
        "reward",
        f"[bold]{fmt(p.last('reward_mean'))}[/bold] (first step {fmt(first)}, target "
        f"{fmt(cfg.trainer.reward_target)})",
    )
    t.add_row(
        "staleness",
        f"{staleness_text(p, snap.get('eta', cfg.staleness.eta))}; last step arrived max "
        f"{fmt(p.last('staleness_max'))}, dropped {p.dropped()}",
    )
    t.add_row("waste", report.waste_text(p.rows[-1] if p.rows else None))
    t.add_row(
        "throughput",
        f"generated {fmt(p.gen_rate(), 1)} groups/s, trained {fmt(p.train_rate(), 1)} groups/s",
    )
    t.add_row(
        "buffer",
        f"{fmt(_queued(buf))} groups queued, {fmt(buf.get('pending'))} read by the trainer (acked "
        f"at its next checkpoint), dead-letter {fmt(buf.get('dead_letter'))}",
    )
    if snap:
        t.add_row(
            "gate",
            f"admitted {snap['admitted']}, finished {snap['finished']}, rejected "
            f"{snap['rejected']}, in flight {snap['inflight']}, capacity {snap['capacity']}",
        )
    util = p.server_util()
    t.add_row(
        "waiting",
        f"trainer for data {p.idle_s():.1f}s, worker at the gate {p.gate_blocked_s():.1f}s, "
        f"server busy {fmt(util * 100 if util is not None else None, 0, '%')}",
    )
    return t


def render(p: Progress, cfg: SluiceConfig, sup: Supervisor, engine: str) -> Any:
    """The rich live view: the run's numbers, the processes, the latest process events."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    procs = Table(show_header=True, title="processes", title_justify="left")
    for col in ("name", "pid", "state", "restarts", "log"):
        procs.add_column(col)
    for name in CHILD_ORDER:
        c = sup.children.get(name)
        if c is not None:
            procs.add_row(name, str(c.pid), c.state, str(c.restarts), str(c.log_path))
    parts: list[Any] = [_summary_table(p, cfg, engine), procs]
    if p.events:
        parts.append("\n".join(escape(e) for e in p.events))
    return Group(*parts)


class View:
    """The demo's screen while it watches a run, used as a context manager: a rich live view
    redrawn on every ``update`` (``live=True``), or a plain progress line when the trainer's
    step moved (at most every 2 s) and at least every 10 s. ``say`` prints a line above the
    live view. Leaving the ``with`` block draws the last state and ends the live view."""

    def __init__(
        self,
        progress: Progress,
        cfg: SluiceConfig,
        sup: Supervisor,
        engine: str,
        *,
        live: bool,
    ) -> None:
        self.progress = progress
        self.cfg = cfg
        self.sup = sup
        self.engine = engine
        self.live = live
        self._console: Any = None
        self._live: Any = None
        self._last_line = 0.0
        self._last_step: Any = None

    def _render(self) -> Any:
        return render(self.progress, self.cfg, self.sup, self.engine)

    def __enter__(self) -> View:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._live = Live(
                self._render(), console=self._console, auto_refresh=False, transient=False
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.stop()
        self._live = None
        self._console = None

    def say(self, line: str) -> None:
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def update(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            return
        step = self.progress.last("step")
        now = time.monotonic()
        if (step != self._last_step and now - self._last_line >= 2.0) or (
            now - self._last_line >= 10.0
        ):
            self.say(plain_line(self.progress, self.cfg))
            self._last_line, self._last_step = now, step
