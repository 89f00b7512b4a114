"""The bench's summary numbers (efficiency, speedup over eta 0), its table and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def summarize(gen: float, train: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``efficiency`` = best async groups/s / min(gen, train) (best over eta >= 1);
    ``speedup_vs_sync`` = best async / eta 0."""
    async_runs = [x for x in runs if x["eta"] >= 1]
    sync = next((x for x in runs if x["eta"] == 0), None)
    best = max(async_runs, key=lambda x: x["groups_per_s"]) if async_runs else None
    return {
        "efficiency": best["groups_per_s"] / min(gen, train) if best else None,
        "speedup_vs_sync": best["groups_per_s"] / sync["groups_per_s"] if best and sync else None,
        "best_eta": best["eta"] if best else None,
    }


def plot(path: str, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    etas = [x["eta"] for x in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(etas, [x["groups_per_s"] for x in runs], "o-", label="pipeline (trained groups/s)")
    a.axhline(doc["gen_ceiling"], color="tab:green", ls="--", label="generation ceiling")
    a.axhline(doc["train_ceiling"], color="tab:red", ls="--", label="training ceiling")
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
    """``benchmarks.common.print_table``, wide enough for 12 columns when piped."""
    from benchmarks.common import print_table as common_table

    common_table(title, columns, rows, width=160)


COLUMNS = ["eta", "groups/s", "tok/s", "trainer idle", "server idle", "stale mean", "stale max"]
COLUMNS += ["dropped", "reward", "redis peak KiB", "bound KiB", "buf+gate %"]


def _table_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """The two ceilings, then one row per run, in ``COLUMNS`` order."""
    g, t, share = doc["gen_ceiling"], doc["train_ceiling"], doc["buffer_gate_share"]
    gen, train = doc["gen"], doc["train"]
    rows: list[list[Any]] = [
        ["gen ceiling", g, g * gen["tokens_per_group"], "-", gen["server_idle"] or 0.0] + ["-"] * 7,
        ["train ceiling", t, t * train["tokens_per_s"] / train["groups_per_s"]]
        + ["-"] * 4
        + [train["dropped"], "-", "-", "-", 100 * share],
    ]
    bare = gen.get("bare")
    if bare:  # the server without sluice, at the worker's concurrency
        rows.insert(1, ["bare decode", "-", bare["tokens_per_s"]] + ["-"] * 9)
    for x in doc["runs"]:
        rows.append(
            [
                x["eta"],
                x["groups_per_s"],
                x["tokens_per_s"],
                x["trainer_idle"],
                x["server_idle"] if x["server_idle"] is not None else "-",
                x["mean_staleness"],
                x["max_staleness"],
                x["dropped"],
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
