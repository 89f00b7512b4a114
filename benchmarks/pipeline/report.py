"""The bench's summary numbers (efficiency, speedup over eta 0), its table and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def summarize(gen: float, train: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``efficiency`` = best async groups/s / min(gen, train) (best over fixed eta >= 1);
    ``speedup_vs_sync`` = best async / eta 0; for the ``auto`` run, its throughput over the best
    fixed eta's (``auto_vs_best``) and the largest eta it used against that eta + 1 (the
    issue's goal: within 5% of the best, with eta no larger than best + 1)."""
    fixed = [x for x in runs if x["eta"] != "auto"]
    async_runs = [x for x in fixed if x["eta"] >= 1]
    sync = next((x for x in fixed if x["eta"] == 0), None)
    auto = next((x for x in runs if x["eta"] == "auto"), None)
    best = max(async_runs, key=lambda x: x["groups_per_s"]) if async_runs else None
    return {
        "efficiency": best["groups_per_s"] / min(gen, train) if best else None,
        "speedup_vs_sync": best["groups_per_s"] / sync["groups_per_s"] if best and sync else None,
        "best_eta": best["eta"] if best else None,
        "auto_vs_best": auto["groups_per_s"] / best["groups_per_s"] if auto and best else None,
        "auto_eta_max_used": auto.get("eta_max_used") if auto else None,
    }


def plot(path: str, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = next((x for x in doc["runs"] if x["eta"] == "auto"), None)
    runs = [x for x in doc["runs"] if x["eta"] != "auto"]
    etas = [x["eta"] for x in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(etas, [x["groups_per_s"] for x in runs], "o-", label="pipeline (trained groups/s)")
    a.axhline(doc["gen_ceiling"], color="tab:green", ls="--", label="generation ceiling")
    a.axhline(doc["train_ceiling"], color="tab:red", ls="--", label="training ceiling")
    if auto is not None and auto.get("eta_mean") is not None:
        a.plot([auto["eta_mean"]], [auto["groups_per_s"]], "*", ms=12, label="eta: auto (mean eta)")
    a.set_xlabel("staleness limit eta")
    a.set_ylabel("groups / s")
    a.set_ylim(bottom=0)
    a.set_title(f"throughput ({doc['workload']})")
    a.legend(fontsize=8)
    b.plot(etas, [x["trainer_idle"] for x in runs], "o-", label="trainer idle")
    b.plot(
        etas,
        [x["server_idle"] if x["server_idle"] is not None else float("nan") for x in runs],
        "s-",
        label="inference server idle",
    )
    b.set_xlabel("staleness limit eta")
    b.set_ylabel("idle fraction")
    b.set_ylim(0, 1)
    b.set_title("idle fraction")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(etas)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """``benchmarks.common.print_table``, wide enough for 17 columns when piped."""
    from benchmarks.common import print_table as common_table

    common_table(title, columns, rows, width=240)


COLUMNS = ["eta", "groups/s", "tok/s", "trainer idle", "server idle", "stale mean", "stale max"]
COLUMNS += ["trained max", "dropped", "cancelled", "drop+cancel %", "waste tok %", "hold s"]
COLUMNS += ["reward", "redis peak KiB", "bound KiB", "buf+gate %"]


def _eta_label(x: dict[str, Any]) -> str:
    if x["eta"] != "auto":
        return str(x["eta"])
    mean, top = x.get("eta_mean"), x.get("eta_max_used")
    return f"auto (mean {mean:.1f}, max {top})" if mean is not None else "auto"


def _table_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """The two ceilings, then one row per run, in ``COLUMNS`` order."""
    g, t, share = doc["gen_ceiling"], doc["train_ceiling"], doc["buffer_gate_share"]
    gen, train = doc["gen"], doc["train"]
    rows: list[list[Any]] = [
        ["gen ceiling", g, g * gen["tokens_per_group"], "-", gen["server_idle"] or 0.0]
        + ["-"] * 12,
        ["train ceiling", t, t * train["tokens_per_s"] / train["groups_per_s"]]
        + ["-"] * 5
        + [train["dropped"]]
        + ["-"] * 7
        + [100 * share],
    ]
    bare = gen.get("bare")
    if bare:  # the server without sluice, at the worker's concurrency
        rows.insert(1, ["bare decode", "-", bare["tokens_per_s"]] + ["-"] * (len(COLUMNS) - 3))
    for x in doc["runs"]:
        rows.append(
            [
                _eta_label(x),
                x["groups_per_s"],
                x["tokens_per_s"],
                x["trainer_idle"],
                x["server_idle"] if x["server_idle"] is not None else "-",
                x["mean_staleness"],
                x["max_staleness"],
                x.get("max_staleness_trained", "-"),
                x["dropped"],
                x.get("cancelled", "-"),
                100 * x.get("dropped_or_cancelled_share", 0.0),
                100 * (x.get("waste_share") or 0.0),
                x.get("hold_s", 0.0),
                x["final_reward"],
                x["redis_peak_bytes"] / 1024,
                x["redis_bound_bytes"] / 1024,
                100 * x["buffer_gate_share"],
            ]
        )
    return rows


def print_results(doc: dict[str, Any]) -> None:
    """The table of ceilings and runs, then the efficiency line."""
    inference, training = doc["placement"]["inference_cpus"], doc["placement"]["training_cpus"]
    print_table(
        f"pipeline: {doc['workload']}, cpus inference {inference} / training {training}",
        COLUMNS,
        _table_rows(doc),
    )
    eff, sp = doc["efficiency"], doc["speedup_vs_sync"]
    print(
        f"efficiency (best async / min(gen, train)) = {eff:.3f}"
        if eff is not None
        else "efficiency: no eta >= 1 run",
        f"; speedup vs eta 0 = {sp:.2f}x" if sp is not None else "",
        f"; buffer+gate share of trainer wall (training ceiling) = "
        f"{100 * doc['buffer_gate_share']:.2f}%",
        sep="",
    )
    if doc.get("auto_vs_best") is not None:
        print(
            f"eta: auto: {100 * doc['auto_vs_best']:.1f}% of the best fixed eta's throughput "
            f"(eta {doc['best_eta']}), largest eta used {doc['auto_eta_max_used']}"
        )
    gen, train = doc["gen"], doc["train"]
    if gen.get("bare"):
        print(
            f"worker-driven decode / bare decode at concurrency {gen['bare']['concurrency']}: "
            f"{gen['worker_vs_bare']:.3f} ({gen['tokens_per_s']:.0f} vs "
            f"{gen['bare']['tokens_per_s']:.0f} output tok/s)"
        )
    phases = train.get("phase_s_per_step")
    if phases:
        print(
            "training ceiling per step: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items())
            + f" of {train['wall_s_per_step']:.3f}s; weights via "
            + (", ".join(train.get("weights_via") or []) or "-")
        )
