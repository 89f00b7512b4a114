"""A run's report, rebuilt from its files alone: ``RUN_DIR/report/{summary.json, report.md, *.png}``.

Inputs (only ``metrics.jsonl`` is required; every key is optional and a line that is not a JSON
object is skipped and counted):

- ``metrics.jsonl``: one object per trainer step (``trainer/metrics.py``): ``step``,
  ``reward_mean``, ``reward_std``, ``staleness_hist`` ({staleness: groups} over the groups
  that arrived), ``staleness_max``, ``staleness_max_trained`` (the max staleness over the groups
  that reached that optimizer step; null when none did), ``dropped``, ``dropped_total``,
  ``groups``, ``samples``, ``tokens``, ``idle_s``, ``step_s``, ``wall_s`` (since that trainer
  process started), ``time`` (unix), ``replay``; and event lines (an ``event`` key, no
  ``step``): ``{"event": "eval", "version", "greedy_reward", "sampled_reward", "prompts", ...}``,
  the held-out eval results the trainer copied from Redis, one per evaluated version.
- ``config.yaml``: the run config, written by ``sluice demo`` or by the trainer
  (``sluice.runconfig``) (``staleness.eta``, ``staleness.batch_groups``,
  ``trainer.reward_target``, ``task.name``).
- ``progress.jsonl`` (written by ``sluice demo``): gate counters over time (``time``,
  ``finished``, ...), for the generation side of the throughput plot.
- ``workers.json`` (written by ``sluice demo``): worker metrics and weight-update records
  (``updates``: [{``version``, ``latency_s``, ...}]).
- ``events.jsonl`` (written by ``sluice demo``): process starts, deaths and restarts.

Invariants (tests/unit/sluice/test_sluice_report.py):
- A step logged more than once (a resumed trainer replays the steps whose updates a crash lost)
  counts once: its last row wins.
- ``initial_reward`` is the reward of the first step, ``final_reward`` that of the last;
  ``turns_mean`` the model turns per trained episode over the run (the steps' ``turns_mean``
  weighted by their ``samples``; 1 for single-turn tasks);
  ``wall_s`` runs from the first trainer start (``time - wall_s`` of the earliest row) to the
  last row's ``time``; ``groups_per_s`` = groups the trainer received / ``wall_s``.
- ``max_staleness_trained`` comes from the steps' ``staleness_max_trained`` only and is never
  clipped to eta: a group trained over eta shows as such. ``max_staleness_arrived`` comes from
  the arrival histogram (dropped groups included). report.md shows the two apart.
- Event lines never count as steps. An eval logged more than once (by version) counts once:
  its last line wins; ``evals`` is sorted by version.
- The same files give the same ``summary.json`` (nothing depends on when it is built).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTS = ("reward.png", "eval.png", "staleness.png", "throughput.png", "weight_update.png")
EVAL_ROWS = 20
"""report.md lists at most this many evals (the first, the last, and evenly spaced between)."""


class ReportError(ValueError):
    """The run directory has nothing to report (no metrics file, or no step in it)."""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of ``path`` (one a line) and how many lines were skipped as malformed."""
    rows: list[dict[str, Any]] = []
    bad = 0
    if not path.is_file():
        return rows, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def unique_steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per step number (the last logged wins), sorted by step; rows without a numeric
    ``step`` are numbered after the previous row; event lines (an ``event`` key) are skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    last = 0
    for r in rows:
        if "event" in r:
            continue
        s = _num(r.get("step"))
        n = int(s) if s is not None else last + 1
        last = n
        by_step[n] = r
    return [dict(by_step[k], step=k) for k in sorted(by_step)]


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval events of ``metrics.jsonl`` rows, one per version (the last logged wins),
    sorted by version: ``version``, ``greedy_reward``, ``sampled_reward``, ``prompts``,
    ``trainer_step`` (None where a line lacks one)."""
    by_version: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("event") != "eval":
            continue
        v = _num(r.get("version"))
        if v is None:
            continue
        by_version[int(v)] = {
            "version": int(v),
            "greedy_reward": _num(r.get("greedy_reward")),
            "sampled_reward": _num(r.get("sampled_reward")),
            "prompts": r.get("prompts") if isinstance(r.get("prompts"), int) else None,
            "trainer_step": r.get("trainer_step")
            if isinstance(r.get("trainer_step"), int)
            else None,
        }
    return [by_version[k] for k in sorted(by_version)]


def _eval_summary(evals: list[dict[str, Any]]) -> dict[str, Any]:
    greedy = [e["greedy_reward"] for e in evals if e["greedy_reward"] is not None]
    return {
        "evals": evals,
        "final_eval": evals[-1] if evals else None,
        "best_eval_greedy": max(greedy) if greedy else None,
    }


def _read_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cfg(cfg: dict[str, Any], section: str, name: str) -> Any:
    sec = cfg.get(section)
    return sec.get(name) if isinstance(sec, dict) else None


def _hist(steps: list[dict[str, Any]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for r in steps:
        h = r.get("staleness_hist")
        if not isinstance(h, dict):
            continue
        for k, v in h.items():
            try:
                key = int(str(k).rstrip("+"))
            except ValueError:
                continue
            n = _num(v)
            if n is not None:
                total[key] = total.get(key, 0) + int(n)
    return dict(sorted(total.items()))


def _wall(steps: list[dict[str, Any]]) -> float | None:
    starts = []
    ends = []
    for r in steps:
        t, w = _num(r.get("time")), _num(r.get("wall_s"))
        if t is not None:
            ends.append(t)
            starts.append(t - w if w is not None else t)
    if ends:
        return max(ends) - min(starts)
    spent = [(_num(r.get("step_s")) or 0.0) + (_num(r.get("idle_s")) or 0.0) for r in steps]
    return sum(spent) if any(spent) else None


def _updates(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "workers.json"
    if not p.is_file():
        return []
    try:
        data = json.loads(p.read_text())
    except ValueError:
        return []
    out = []
    for w in data.get("workers", []) if isinstance(data, dict) else []:
        for u in w.get("updates", []) if isinstance(w, dict) else []:
            if isinstance(u, dict) and _num(u.get("latency_s")) is not None:
                out.append(u)
    return out


def _restarts(run_dir: Path) -> dict[str, int]:
    events, _ = read_jsonl(run_dir / "events.jsonl")
    out: dict[str, int] = {}
    for e in events:
        if e.get("kind") == "restarted" and isinstance(e.get("name"), str):
            out[e["name"]] = out.get(e["name"], 0) + 1
    return out


def _ints(steps: list[dict[str, Any]], key: str) -> list[int]:
    """The numeric values of ``key`` over ``steps`` as ints (absent, null or not a number:
    left out)."""
    vals = (_num(r.get(key)) for r in steps)
    return [int(x) for x in vals if x is not None]


def _staleness(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Staleness as it reached the optimizer and as it arrived, kept apart.

    ``max_staleness_trained``: the largest per-step ``staleness_max_trained`` (the trainer's
    max over the groups that reached that optimizer step); None when no step carries one. It
    is reported as logged, never clipped to eta, so a group trained over eta shows.
    ``max_staleness_arrived``: the largest staleness in the arrival histogram (every group the
    trainer received, dropped ones included). ``max_staleness``: the larger of that and every
    step's ``staleness_max``."""
    hist = _hist(steps)
    n_hist = sum(hist.values())
    return {
        "max_staleness": max(_ints(steps, "staleness_max") + list(hist), default=None),
        "max_staleness_trained": max(_ints(steps, "staleness_max_trained"), default=None),
        "max_staleness_arrived": max(hist, default=None),
        "mean_staleness": sum(k * v for k, v in hist.items()) / n_hist if n_hist else None,
        "staleness_hist": {str(k): v for k, v in hist.items()},
    }


def _dropped(steps: list[dict[str, Any]]) -> int:
    """Groups dropped over eta: the largest running total when the rows carry one, else the
    sum of the per-step counts."""
    totals = [t for t in (_num(r.get("dropped_total")) for r in steps) if t is not None]
    if totals:
        return int(max(totals))
    return int(sum(_num(r.get("dropped")) or 0 for r in steps))


def _waste(steps: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What was generated and thrown away: the run's books as the last step saw them
    (``generated_tokens``, ``wasted_tokens`` by cause, groups cancelled by workers and dropped
    by the trainer), the groups wasted as a share of the groups generated (received by the
    trainer plus cancelled before they reached it), the seconds the trainer held for groups
    that would have expired, and every change ``eta: auto`` made."""
    last: dict[str, Any] = next(
        (r for r in reversed(steps) if r.get("generated_tokens") is not None), {}
    )
    received = int(sum(_num(r.get("groups")) or 0 for r in steps))
    cancelled = int(_num(last.get("cancelled_total")) or 0)
    dropped = _dropped(steps)
    generated_groups = received + cancelled
    return {
        "groups_received": received,
        "cancelled_groups": cancelled,
        "dropped_or_cancelled_share": (dropped + cancelled) / generated_groups
        if generated_groups
        else None,
        "generated_tokens": last.get("generated_tokens"),
        "wasted_tokens": last.get("wasted_tokens"),
        "waste_share": last.get("waste_share"),
        "wasted_tokens_by": last.get("wasted_tokens_by") or {},
        "hold_s": sum(_num(r.get("hold_s")) or 0.0 for r in steps),
        "eta_changes": [r for r in rows if r.get("event") == "eta"],
    }


def waste_text(row: dict[str, Any] | None) -> str:
    """A step row's (or a summary's) waste in words: ``0.12% of 88,457 generated tokens
    (cancelled 2, dropped 1)``; ``n/a`` before the books have any."""
    if not row or row.get("waste_share") is None:
        return "n/a"
    cancelled = row.get("cancelled_total", row.get("cancelled_groups"))
    dropped = row.get("dropped_total", row.get("dropped_groups"))
    return (
        f"{row['waste_share']:.2%} of {row.get('generated_tokens') or 0:,} generated tokens "
        f"(groups cancelled {_fmt(cancelled)}, dropped {_fmt(dropped)})"
    )


def _throughput(steps: list[dict[str, Any]], wall: float | None) -> dict[str, Any]:
    """What the trainer received and how fast, over the run's wall time."""
    groups = int(sum(_num(r.get("groups")) or 0 for r in steps))
    samples = int(sum(_num(r.get("samples")) or 0 for r in steps))
    tokens = int(sum(_num(r.get("tokens")) or 0 for r in steps))
    idle = sum(_num(r.get("idle_s")) or 0.0 for r in steps)

    def rate(n: int) -> float | None:
        return n / wall if wall and wall > 0 else None

    return {
        "groups_trained": groups,
        "groups_per_s": rate(groups),
        "samples_per_s": rate(samples),
        "tokens_per_s": rate(tokens),
        "trainer_idle_s": idle,
        "trainer_idle_frac": idle / wall if wall else None,
    }


def _weight_updates(run_dir: Path) -> dict[str, Any] | None:
    lat = sorted(float(u["latency_s"]) for u in _updates(run_dir))
    if not lat:
        return None
    return {
        "count": len(lat),
        "mean_s": statistics.fmean(lat),
        "p50_s": statistics.median(lat),
        "max_s": lat[-1],
    }


def _update_bytes(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """``weight_update_bytes``: the median bytes one weight update moved (a LoRA run: the
    adapter); ``model_bytes``: one full-weight update's bytes (the base model in the published
    dtype). None when the trainer did not log them."""
    sent = [int(r["weight_update_bytes"]) for r in steps if r.get("weight_update_bytes")]
    full = [int(r["model_bytes"]) for r in steps if r.get("model_bytes")]
    return {
        "weight_update_bytes": int(statistics.median(sent)) if sent else None,
        "model_bytes": full[-1] if full else None,
    }


def _turns_mean(steps: list[dict[str, Any]]) -> float | None:
    """Sample-weighted mean of the steps' ``turns_mean`` (None when no step has one)."""
    total = weighted = 0.0
    for r in steps:
        t, n = _num(r.get("turns_mean")), _num(r.get("samples"))
        if t is not None and n:
            total += n
            weighted += t * n
    return weighted / total if total else None


def _rewards(steps: list[dict[str, Any]], target: Any) -> dict[str, Any]:
    # With dynamic sampling the trained mean leaves out the filtered (all-equal) groups:
    # reward_mean_all counts them too (trainer.metrics.filtered_fields).
    rewards = [_num(r.get("reward_mean_all", r.get("reward_mean"))) for r in steps]
    known = [x for x in rewards if x is not None]
    final = rewards[-1]
    return {
        "initial_reward": rewards[0],
        "final_reward": final,
        # Model turns per trained episode (1 for single-turn tasks), over the whole run.
        "turns_mean": _turns_mean(steps),
        "best_reward": max(known) if known else None,
        "reward_target": target,
        "reached_target": (final >= target) if (target is not None and final is not None) else None,
    }


def summarize(run_dir: str | Path, *, eta: int | None = None) -> dict[str, Any]:
    """The run's summary (see the module docstring); ``ReportError`` if there is no step."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{metrics} does not exist: is {run_dir} a run directory?")
    rows, bad = read_jsonl(metrics)
    steps = unique_steps(rows)
    if not steps:
        raise ReportError(f"{metrics} holds no step (lines skipped as malformed: {bad})")
    cfg = _read_config(run_dir)
    if eta is None:
        eta = _cfg(cfg, "staleness", "eta")
    wall = _wall(steps)
    return {
        "run_dir": str(run_dir),
        "task": _cfg(cfg, "task", "name"),
        "steps": len(steps),
        "last_step": steps[-1]["step"],
        **_rewards(steps, _cfg(cfg, "trainer", "reward_target")),
        "wall_s": wall,
        "eta": eta,
        "batch_groups": _cfg(cfg, "staleness", "batch_groups"),
        **_staleness(steps),
        "dropped_groups": _dropped(steps),
        **_waste(steps, rows),
        **_throughput(steps, wall),
        "replayed_steps": sum(1 for r in rows if r.get("replay") is True),
        "weight_updates": _weight_updates(run_dir),
        **_update_bytes(steps),
        "restarts": _restarts(run_dir),
        **_eval_summary(eval_rows(rows)),
        "malformed_lines": bad,
    }


# ---------------------------------------------------------------------- plots
def _plot_reward(steps: list[dict[str, Any]], s: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    xs, ys, lo, hi = [], [], [], []
    for r in steps:
        y = _num(r.get("reward_mean"))
        if y is None:
            continue
        sd = _num(r.get("reward_std")) or 0.0
        xs.append(r["step"])
        ys.append(y)
        lo.append(max(0.0, y - sd))
        hi.append(min(1.0, y + sd))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    eta = s.get("eta")
    label = f"mean reward per step (eta={eta})" if eta is not None else "mean reward per step"
    ax.fill_between(xs, lo, hi, alpha=0.18, color="tab:blue", linewidth=0, label="± 1 std")
    ax.plot(xs, ys, color="tab:blue", linewidth=2, marker="o", markersize=3, label=label)
    if s.get("reward_target") is not None:
        ax.axhline(
            s["reward_target"],
            color="tab:green",
            linestyle="--",
            linewidth=1.2,
            label=f"target {s['reward_target']}",
        )
    task = s.get("task") or "run"
    wall = s.get("wall_s")
    title = (
        f"sluice: {task} - reward {_fmt(s.get('initial_reward'))} → {_fmt(s.get('final_reward'))}"
    )
    if wall:
        title += f" in {s['steps']} steps, {wall:.0f} s"
    ax.set_title(title)
    ax.set_xlabel("trainer step (policy version)")
    _finish_reward_plot(fig, ax, path)


def _finish_reward_plot(fig: Any, ax: Any, path: Path) -> None:
    """The reward axis (0..1), grid and legend of a reward plot, saved to ``path``."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_eval(steps: list[dict[str, Any]], s: dict[str, Any], path: Path) -> None:
    """Held-out eval reward (greedy, sampled) by policy version, the training reward beside."""
    import matplotlib.pyplot as plt

    evals = s["evals"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    tx = [_num(r.get("version")) for r in steps]
    ty = [_num(r.get("reward_mean")) for r in steps]
    train = [(x, y) for x, y in zip(tx, ty, strict=True) if x is not None and y is not None]
    if train:
        ax.plot(
            [x for x, _ in train],
            [y for _, y in train],
            color="tab:blue",
            alpha=0.35,
            linewidth=1,
            label="training reward (mean per step)",
        )
    for key, color, label in (
        ("greedy_reward", "tab:green", "eval, greedy"),
        ("sampled_reward", "tab:orange", "eval, sampled"),
    ):
        pts = [(e["version"], e[key]) for e in evals if e[key] is not None]
        if pts:
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                color=color,
                linewidth=2,
                marker="o",
                markersize=4,
                label=label,
            )
    ax.set_title(f"held-out eval ({len(evals)} evaluations)")
    ax.set_xlabel("policy version")
    _finish_reward_plot(fig, ax, path)


def _plot_staleness(s: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    hist = {int(k): v for k, v in s["staleness_hist"].items()}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    eta = s.get("eta")
    keys = sorted(hist)
    colors = ["tab:red" if (eta is not None and k > eta) or k < 0 else "tab:blue" for k in keys]
    ax.bar(range(len(keys)), [hist[k] for k in keys], color=colors)
    ax.set_xticks(range(len(keys)), [str(k) for k in keys])
    title = "staleness of groups received by the trainer"
    if eta is not None:
        title += f" (eta={eta})"
    ax.set_title(title)
    ax.set_xlabel("trainer version - oldest token version")
    ax.set_ylabel("groups")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_throughput(steps: list[dict[str, Any]], run_dir: Path, path: Path) -> bool:
    import matplotlib.pyplot as plt

    pts: list[tuple[float, float, float]] = []  # (time, groups, trainer start)
    for r in steps:
        t = _num(r.get("time"))
        if t is not None:
            pts.append((t, _num(r.get("groups")) or 0.0, t - (_num(r.get("wall_s")) or 0.0)))
    if len(pts) < 2:
        return False
    t0 = min(p[2] for p in pts)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    w = min(5, len(pts) - 1)  # trainer side: groups/s over a sliding window of steps
    xs, ys = [], []
    for i in range(w, len(pts)):
        dt = pts[i][0] - pts[i - w][0]
        if dt > 0:
            xs.append(pts[i][0] - t0)
            ys.append(sum(p[1] for p in pts[i - w + 1 : i + 1]) / dt)
    ax.plot(xs, ys, label=f"trained (groups/s, {w}-step window)", color="tab:blue")
    progress, _ = read_jsonl(run_dir / "progress.jsonl")
    gen: list[tuple[float, float]] = []  # (time, groups finished or rejected so far)
    for p in progress:
        t, f = _num(p.get("time")), _num(p.get("finished"))
        if t is not None and f is not None:
            gen.append((t, f + (_num(p.get("rejected")) or 0.0)))
    k = min(5, len(gen) - 1)  # generation side: over a sliding window of k samples
    gx, gy = [], []
    for i in range(k, len(gen)) if k >= 1 else ():
        dt = gen[i][0] - gen[i - k][0]
        if dt > 0:
            gx.append(gen[i][0] - t0)
            gy.append((gen[i][1] - gen[i - k][1]) / dt)
    if gx:
        ax.plot(gx, gy, label="generated (groups/s, finished + rejected)", color="tab:orange")
    ax.set_title("throughput over time")
    ax.set_xlabel("seconds since the trainer started")
    ax.set_ylabel("groups / s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_updates(run_dir: Path, path: Path) -> bool:
    import matplotlib.pyplot as plt

    ups = sorted(_updates(run_dir), key=lambda u: _num(u.get("version")) or 0)
    if not ups:
        return False
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    xs = [_num(u.get("version")) or 0 for u in ups]
    ys = [float(u["latency_s"]) * 1000 for u in ups]
    ax.plot(xs, ys, marker="o", markersize=3, linestyle="none", label="per update")
    ax.axhline(statistics.median(ys), color="tab:green", linestyle="--", label="median")
    ax.set_title("weight update: event received → all servers serving the new version")
    ax.set_xlabel("policy version")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def staleness_text(trained: Any, arrived: Any, eta: Any, fmt: Callable[[Any], str] = _fmt) -> str:
    """Trained and arrived staleness apart, e.g. ``trained max 2 · arrived max 3 (eta 2)``:
    the one wording of the report, the demo's final line and its live view (``fmt`` renders
    each value; the live view shows an unknown one as ``-``)."""
    return f"trained max {fmt(trained)} · arrived max {fmt(arrived)} (eta {fmt(eta)})"


def staleness_line(s: dict[str, Any]) -> str:
    """``staleness_text`` of a summary."""
    return staleness_text(s["max_staleness_trained"], s["max_staleness_arrived"], s["eta"])


def _markdown(s: dict[str, Any], plots: list[str]) -> str:
    lines = [
        f"# sluice run report: `{s['run_dir']}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| task | {_fmt(s['task'])} |",
        f"| steps | {s['steps']} (last step {s['last_step']}, replayed rows {s['replayed_steps']}) |",
        f"| reward | {_fmt(s['initial_reward'])} → {_fmt(s['final_reward'])} "
        f"(best {_fmt(s['best_reward'])}, target {_fmt(s['reward_target'])}) |",
        f"| wall time | {_fmt(s['wall_s'], 1)} s |",
        f"| eta / batch groups | {_fmt(s['eta'])} / {_fmt(s['batch_groups'])} |",
        f"| staleness | {staleness_line(s)}; arrived mean {_fmt(s['mean_staleness'], 2)} |",
        f"| dropped groups (over-stale) | {s['dropped_groups']} |",
        f"| cancelled groups (by workers, past eta) | {s['cancelled_groups']} |",
        f"| dropped + cancelled | {_fmt((s['dropped_or_cancelled_share'] or 0) * 100, 2)}% of "
        f"{s['groups_received'] + s['cancelled_groups']} groups generated |",
        f"| waste | {waste_text(s)} |",
        f"| trainer holding for expiring groups | {_fmt(s['hold_s'], 1)} s |",
        f"| groups received by the trainer | {s['groups_trained']} ({_fmt(s['groups_per_s'], 2)} groups/s, "
        f"{_fmt(s['samples_per_s'], 1)} samples/s) |",
        f"| trainer waiting for data | {_fmt(s['trainer_idle_s'], 1)} s "
        f"({_fmt((s['trainer_idle_frac'] or 0) * 100, 1)}% of wall) |",
    ]
    wu = s.get("weight_updates")
    if wu:
        lines.append(
            f"| weight updates | {wu['count']}: median {wu['p50_s'] * 1000:.1f} ms, "
            f"max {wu['max_s'] * 1000:.1f} ms |"
        )
    if s.get("weight_update_bytes") and s.get("model_bytes"):
        sent, full = s["weight_update_bytes"], s["model_bytes"]
        lines.append(
            f"| bytes per weight update | {sent / 1e6:.3f} MB (median; full weights "
            f"{full / 1e6:.3f} MB: {100 * sent / full:.1f}%) |"
        )
    if s.get("restarts"):
        lines.append(
            "| restarts | "
            + ", ".join(f"{k} x{v}" for k, v in sorted(s["restarts"].items()))
            + " |"
        )
    if s.get("eta_changes"):
        lines += ["", "eta: auto changes:", ""]
        for c in s["eta_changes"]:
            what = (
                f"admission -> {c['admit']}"
                if "admit" in c
                else f"{c.get('from')} -> {c.get('to')}"
            )
            lines.append(
                f"- step {c.get('trainer_step')}: {what} ({c.get('rule')}; idle share "
                f"{c.get('idle_share')}, hold share {c.get('hold_share')}, waste share "
                f"{c.get('waste_share')}, gate refusals {c.get('gate_refusals')})"
            )
    evals = s.get("evals") or []
    if evals:
        lines += ["", *_eval_markdown(evals)]
    lines.append("")
    for p in plots:
        lines += [f"![{p[:-4]}]({p})", ""]
    lines.append("Rebuild with `sluice report RUN_DIR`; numbers in `summary.json`.")
    return "\n".join(lines) + "\n"


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices of ``range(n)`` (all when ``n <= k``): the first, the last, evenly between."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _eval_markdown(evals: list[dict[str, Any]]) -> list[str]:
    shown = _spread(len(evals), EVAL_ROWS)
    lines = [
        "## Held-out eval",
        "",
        "| version | greedy reward | sampled reward | prompts | trainer step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i in shown:
        e = evals[i]
        lines.append(
            f"| {e['version']} | {_fmt(e['greedy_reward'])} | {_fmt(e['sampled_reward'])} | "
            f"{_fmt(e['prompts'])} | {_fmt(e['trainer_step'])} |"
        )
    if len(shown) < len(evals):
        lines += ["", f"{len(shown)} of {len(evals)} evaluations shown; all in `summary.json`."]
    return lines


def build_report(
    run_dir: str | Path, *, out_dir: str | Path | None = None, eta: int | None = None
) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md`` and the plots to ``out_dir`` (default
    ``RUN_DIR/report``); returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    s = summarize(run_dir, eta=eta)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    steps = unique_steps(rows)
    plots = ["reward.png"]
    _plot_reward(steps, s, out / "reward.png")
    if s["evals"]:
        _plot_eval(steps, s, out / "eval.png")
        plots.append("eval.png")
    if s["staleness_hist"]:
        _plot_staleness(s, out / "staleness.png")
        plots.append("staleness.png")
    if _plot_throughput(steps, run_dir, out / "throughput.png"):
        plots.append("throughput.png")
    if _plot_updates(run_dir, out / "weight_update.png"):
        plots.append("weight_update.png")
    s["plots"] = plots
    (out / "summary.json").write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(_markdown(s, plots))
    return s
