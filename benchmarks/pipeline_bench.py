"""Pipeline throughput: async RL against its own ceilings and against synchronous RL (eta = 0).

One invocation, one model, one task, one machine. With ``--engine cpu`` (default) placement is
disaggregated, as on a GPU cluster where inference and training own their devices: the CPU
server and the rollout worker (and Redis) are pinned to the *inference* cores, the trainer to
the *training* cores (``taskset`` / ``sched_setaffinity``; one torch thread per process). On 2
cores: one each. With ``--engine sglang`` one SGLang server (``--mem-fraction``) and the
trainer (CUDA, bf16 autocast) share one GPU — colocated, time-sliced by the driver — and the
server is started once and reused by every run (each run's worker loads the initial weights
into it); server idle is then the worker's view: time with no request in flight.

Measured, each over a steady-state window that skips the first ``warmup`` train steps (or the
first ``batch_groups`` generated groups):

* **generation ceiling** ``g``: one worker with the gate open (eta 1000) and no trainer,
  groups/s over ``steps * batch_groups`` groups (polling the gate's ``finished`` counter);
* **training ceiling** ``t``: the trainer on the buffer pre-filled by that run (the same
  groups; eta 1000 so none is dropped), trained groups/s from ``metrics.jsonl`` row times;
* **pipeline runs** at each eta of ``--etas``: trainer + worker + server on a fresh private
  ``redis-server`` (fresh ``used_memory_peak``) and (CPU) a fresh server, ``--steps`` steps.
  Per run: trained groups/s and output tokens/s, trainer idle (``idle_s`` / window), server
  idle (``1 - d busy_s / d uptime_s`` of the CPU server's ``/model_info`` over the window),
  mean/max staleness (the trainer's histograms), groups dropped, final reward (mean of the last
  fifth of the steps), Redis ``used_memory_peak`` beside the bound
  ``(eta + 1 + checkpoint_every) * batch_groups * bytes_per_group + overhead``
  (``bytes_per_group``: the largest ``MEMORY USAGE`` of the stream per entry seen while
  sampling; ``overhead``: the empty server's
  ``used_memory`` plus every non-stream key of the run at the end). The trainer acks with
  its checkpoints (``--checkpoint-every``, default every step): ``eta + 1`` batches admitted
  ahead of the trainer, up to ``checkpoint_every`` read and not yet acked.
* **buffer + gate share** of trainer wall time: on the training ceiling (the read never waits
  there) ``(idle_s + buffer_s) / window``; in pipeline runs ``buffer_s / window`` (the blocking
  read's time is inseparable from waiting there, so it is left out).

The ceilings are measured before and after the runs and averaged (the machine may be shared).
Throughput of a pipeline run is *sustained*: trained groups in the window plus the change of
the backlog (pushed, not yet read), so draining the start-up backlog is not counted.
``efficiency = best async groups/s / min(g, t)`` (best over eta >= 1);
``speedup_vs_sync = best async / eta 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline.placement import Placement, Procs
from benchmarks.pipeline.report import finite, plot, print_results, summarize
from benchmarks.pipeline.runner import run_ceilings, run_pipeline
from benchmarks.pipeline.services import start_sglang
from benchmarks.pipeline.workloads import GATE_OPEN_ETA, WORKLOADS, Setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default=None,
        help="task mix and model (default: reverse on cpu, long-tail-gpu on sglang)",
    )
    p.add_argument(
        "--etas",
        nargs="+",
        default=None,
        help="staleness limits, each an int or 'auto' (staleness.eta: auto within [0, the "
        "largest int given]; default 0 1 2 4 8 auto)",
    )
    p.add_argument("--steps", type=int, default=None, help="train steps per run (workload default)")
    p.add_argument("--batch-groups", type=int, default=None, help="groups per train step")
    p.add_argument("--n-samples", type=int, default=None, help="samples per group")
    p.add_argument(
        "--inflight", type=int, default=None, help="worker max_inflight_groups (workload default)"
    )
    p.add_argument("--layers", type=int, default=None, help="model layers (workload default)")
    p.add_argument("--hidden", type=int, default=None, help="model hidden size (workload default)")
    p.add_argument(
        "--engine",
        choices=("cpu", "sglang"),
        default="cpu",
        help="cpu: a CPU reference server per run, core-pinned (default); sglang: one SGLang "
        "server on the GPU for the whole invocation, the trainer on the same GPU",
    )
    p.add_argument(
        "--mem-fraction", type=float, default=0.3, help="SGLang --mem-fraction-static (0.3)"
    )
    p.add_argument("--sglang-args", default="", help="extra SGLang launch arguments, one string")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="trainer checkpoint (and so ack) interval in steps (default 1); the Redis bound "
        "is (eta + 1 + this) batches",
    )
    p.add_argument(
        "--weight-sync",
        choices=("disk", "ipc"),
        default="disk",
        help="trainer.weight_sync of every run (ipc: the trainer hands its weights in memory to "
        "the run's server, which runs on this host; default disk)",
    )
    p.add_argument(
        "--bare-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the generation ceiling, drive its server without sluice at the worker's "
        "concurrency (same prompts, lengths and request body) for worker_vs_bare (default: on "
        "with --engine sglang)",
    )
    p.add_argument(
        "--bare-seconds", type=float, default=20.0, help="bare decode's measured window (20)"
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps left out of every window (default steps // 10, at least 1)",
    )
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: etas 0 2, few steps")
    p.add_argument(
        "--ceilings-twice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the ceilings before and after the runs, use the mean (default: on, "
        "off with --quick)",
    )
    p.add_argument("--json", default=None, help="write results JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of throughput and idle vs eta here")
    p.add_argument("--workdir", default=None, help="run directories and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, metrics)")
    p.add_argument(
        "--run-timeout", type=float, default=300.0, help="seconds one run may take (default 300)"
    )


def _fail(message: str) -> SystemExit:
    return SystemExit(f"bench pipeline: {message}")


def _workload(args: argparse.Namespace) -> dict[str, Any]:
    """The workload's spec with ``--layers``, ``--hidden`` and ``--inflight`` applied (sets the
    default ``--workload`` of the engine)."""
    if args.workload is None:
        args.workload = "long-tail-gpu" if args.engine == "sglang" else "reverse"
    spec: dict[str, Any] = json.loads(json.dumps(WORKLOADS[args.workload]))
    for k in ("layers", "hidden"):
        v = getattr(args, k)
        if v is not None:
            if v < 1:
                raise _fail(f"--{k} must be >= 1, got {v}")
            spec["model"][k] = v
    if args.inflight is not None:
        if args.inflight < 1:
            raise _fail(f"--inflight must be >= 1, got {args.inflight}")
        spec["max_inflight_groups"] = args.inflight
    return spec


def _etas(args: argparse.Namespace) -> list[int | str]:
    raw = (
        args.etas
        if args.etas is not None
        else (["0", "2"] if args.quick else ["0", "1", "2", "4", "8", "auto"])
    )
    etas: list[int | str] = []
    for e in raw:
        if str(e) == "auto":
            etas.append("auto")
            continue
        try:
            etas.append(int(e))
        except ValueError:
            raise _fail(f"--etas: {e!r} is neither an int nor 'auto'") from None
    ints = [e for e in etas if isinstance(e, int)]
    if any(e < 0 or e > GATE_OPEN_ETA - 1 for e in ints):
        raise _fail(f"--etas must be in [0, {GATE_OPEN_ETA - 1}] or 'auto', got {etas}")
    if len(set(etas)) != len(etas):
        raise _fail(f"--etas has duplicates: {etas}")
    return etas


def _sizes(args: argparse.Namespace, spec: dict[str, Any]) -> tuple[int, int, int]:
    """Steps, batch groups and samples per group (sets the default ``--ceilings-twice``);
    checks ``--checkpoint-every``, ``--mem-fraction`` and that SGLang can run."""
    if args.ceilings_twice is None:
        args.ceilings_twice = not args.quick and args.engine == "cpu"
    if args.checkpoint_every < 1:
        raise _fail(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if not 0 < args.mem_fraction <= 1:
        raise _fail(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")
    steps: int = args.steps or (spec["quick_steps"] if args.quick else spec["steps"])
    if steps < 2:
        raise _fail(f"--steps must be >= 2 (one is warm-up), got {steps}")
    bg: int = args.batch_groups or spec["batch_groups"]
    ns: int = args.n_samples or spec["n_samples"]
    if bg < 1 or ns < 1:
        raise _fail("--batch-groups and --n-samples must be >= 1")
    if args.engine == "sglang":
        from inference.launch import EngineUnavailable, choose_engine

        try:
            choose_engine("sglang")
        except EngineUnavailable as e:
            raise _fail(str(e)) from None
    return steps, bg, ns


def _setup(
    args: argparse.Namespace,
    spec: dict[str, Any],
    sizes: tuple[int, int, int],
    workdir: Path,
    etas: list[int | str],
) -> Setup:
    """The invocation's settings, with a tiny random-init model for the workload's task."""
    from inference.models import init_tiny_model
    from rollout_workers.tasks import get_task

    task = get_task(spec["task"], **spec["options"])
    model = init_tiny_model(
        workdir / "model",
        vocab=task.vocab_size,
        bos_token_id=task.bos_token_id,
        eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id,
        seed=0,
        **spec["model"],
    )
    steps, bg, ns = sizes
    return Setup(
        workload=args.workload,
        spec=spec,
        steps=steps,
        batch_groups=bg,
        n_samples=ns,
        workdir=workdir,
        model=model,
        placement=Placement.split(),
        timeout=args.run_timeout,
        procs=Procs(),
        engine=args.engine,
        checkpoint_every=args.checkpoint_every,
        eta_max=max([e for e in etas if isinstance(e, int)], default=8),
        weight_sync=args.weight_sync,
        bare_decode=args.engine == "sglang" if args.bare_decode is None else args.bare_decode,
        bare_measure_s=args.bare_seconds,
        warmup_steps=args.warmup_steps,
    )


def _measure(
    s: Setup, args: argparse.Namespace, etas: list[int | str]
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """The ceilings, one pipeline run per eta, the ceilings again (``--ceilings-twice``);
    every process started is stopped on the way out."""
    try:
        if args.engine == "sglang":
            s.shared_server = start_sglang(s, args.mem_fraction, shlex.split(args.sglang_args))
        ceil = run_ceilings(s)
        print(
            f"ceilings: generation {ceil['gen']['groups_per_s']:.2f} groups/s, "
            f"training {ceil['train']['groups_per_s']:.2f} groups/s",
            flush=True,
        )
        runs = []
        for eta in etas:
            res = run_pipeline(s, eta, ceil["gen"]["bytes_per_group"])
            runs.append(res)
            print(
                f"eta {eta}: {res['groups_per_s']:.2f} groups/s, trainer idle "
                f"{res['trainer_idle']:.2f}, max staleness {res['max_staleness']} (trained "
                f"{res['max_staleness_trained']}), dropped {res['dropped']}, cancelled "
                f"{res['cancelled']}, eta used mean {res['eta_mean']} max {res['eta_max_used']}",
                flush=True,
            )
        # Measured again after the runs: on a shared machine the load moves; the ceilings used
        # are the mean of both measurements (each is in the JSON).
        after = run_ceilings(s) if args.ceilings_twice else None
    finally:
        s.procs.stop_all()
    return ceil, runs, after


def _document(
    args: argparse.Namespace,
    s: Setup,
    measured: tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None],
    load_start: list[float],
    t_all: float,
) -> dict[str, Any]:
    """The bench's JSON: settings, machine, both ceilings (the mean of their measurements),
    every run, the summary numbers and every pid started."""
    from benchmarks.common import machine_info

    ceil, runs, after = measured
    both = [ceil] + ([after] if after else [])
    g = sum(c["gen"]["groups_per_s"] for c in both) / len(both)
    t = sum(c["train"]["groups_per_s"] for c in both) / len(both)
    share = sum(c["train"]["buffer_gate_share"] for c in both) / len(both)
    return {
        "bench": "pipeline",
        "workload": args.workload,
        "engine": args.engine,
        "sglang_args": args.sglang_args if args.engine == "sglang" else None,
        "mem_fraction": args.mem_fraction if args.engine == "sglang" else None,
        "checkpoint_every": args.checkpoint_every,
        "weight_sync": args.weight_sync,
        "task": {"name": s.spec["task"], "options": s.spec["options"]},
        "model": s.spec["model"],
        "steps": s.steps,
        "batch_groups": s.batch_groups,
        "n_samples": s.n_samples,
        "warmup_steps": s.warmup,
        "placement": s.placement.describe(),
        "machine": machine_info(),
        "load_avg_start": load_start,
        "load_avg_end": list(os.getloadavg()),
        "gen_ceiling": g,
        "train_ceiling": t,
        "gen": ceil["gen"],
        "train": ceil["train"],
        "gen_after": after["gen"] if after else None,
        "train_after": after["train"] if after else None,
        "buffer_gate_share": share,
        "runs": runs,
        **summarize(g, t, runs),
        "pids": list(s.procs.pids),
        "elapsed_s": time.monotonic() - t_all,
    }


def run(args: argparse.Namespace) -> int:
    from benchmarks.common import write_json

    spec = _workload(args)
    etas = _etas(args)
    sizes = _sizes(args, spec)
    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sluice-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    s = _setup(args, spec, sizes, workdir, etas)
    print(
        f"pipeline bench: {args.workload} on {args.engine}, {s.steps} steps x {s.batch_groups} "
        f"groups x {s.n_samples} samples, etas {etas}; inference cpus "
        f"{list(s.placement.inference)} (server, worker, redis), training cpus "
        f"{list(s.placement.training)}; workdir {workdir}",
        flush=True,
    )
    t_all = time.monotonic()
    load_start = list(os.getloadavg())
    measured = _measure(s, args, etas)
    doc = _document(args, s, measured, load_start, t_all)
    print_results(doc)
    write_json(args.json, doc)
    if args.plot:
        plot(args.plot, doc)
    if own_dir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = [k for k in ("gen_ceiling", "train_ceiling") if not finite(doc[k]) or doc[k] <= 0]
    return 1 if bad else 0
