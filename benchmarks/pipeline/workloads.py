"""The benchmark's workloads (task mix and model per name), one invocation's settings
(``Setup``) and the run config each run's processes read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.pipeline.bare import BareSpec
from benchmarks.pipeline.placement import Placement, Procs

# Sizes picked so that, on one core each, generating a group and training on it take
# comparable time (see the module docstring of each run's output for the measured ceilings).
# The long-tail workloads fix every sample's output length (task option fixed_lengths: a
# seeded lognormal draw per prompt id and sample, generated with ignore_eos), so a group costs
# the same in the ceiling runs and in every pipeline run, whatever the policy learns; reverse
# keeps policy-decided lengths (a learning workload).
WORKLOADS: dict[str, dict[str, Any]] = {
    "reverse": {
        "task": "reverse",
        "options": {"n_digits": 4},
        "model": {"layers": 3, "hidden": 192},
        "n_samples": 8,
        "batch_groups": 8,
        "max_new_tokens": None,
        "max_inflight_groups": 2,
        "steps": 40,
        "quick_steps": 6,
    },
    "long-tail": {
        "task": "long-tail",
        "options": {
            "median": 16,
            "sigma": 1.0,
            "min_len": 4,
            "max_len": 128,
            "fixed_lengths": True,
        },
        "model": {"layers": 3, "hidden": 192},
        "n_samples": 8,
        "batch_groups": 4,
        "max_new_tokens": None,
        "max_inflight_groups": 4,
        "steps": 30,
        "quick_steps": 5,
    },
    # For one GPU shared by SGLang and the trainer (--engine sglang): a ~100M-parameter Qwen2
    # shape (head_dim 64, GQA 4:1) on long outputs, so that generating a batch and training on
    # it both take real GPU time.
    "long-tail-gpu": {
        "task": "long-tail",
        "options": {
            "median": 64,
            "sigma": 1.0,
            "min_len": 8,
            "max_len": 512,
            "fixed_lengths": True,
        },
        "model": {
            "arch": "qwen2",
            "layers": 9,
            "hidden": 1024,
            "heads": 16,
            "kv_heads": 4,
            "intermediate": 2816,
        },
        "n_samples": 8,
        "batch_groups": 16,
        "max_new_tokens": None,
        "max_inflight_groups": 32,
        "steps": 16,
        "quick_steps": 5,
        # Before fixed_lengths: a random-init 100M model at lr 1e-3 collapsed within 3 steps
        # into 512-token outputs that never stop (groups cost ~15x more than in the ceiling
        # runs); at 1e-5 outputs still grew 3-4x over 16 steps on the H100 (README, "On a
        # GPU"). Lengths are fixed now; lr 1e-5 is kept so the runs stay comparable.
        "trainer": {"lr": 1e-5},
    },
}
GATE_OPEN_ETA = 1000  # the config's upper bound: the ceilings never wait on the gate


@dataclass
class Setup:
    """One invocation's settings, shared by every run it makes."""

    workload: str
    spec: dict[str, Any]
    steps: int
    batch_groups: int
    n_samples: int
    workdir: Path
    model: Path
    placement: Placement
    timeout: float
    procs: Procs
    engine: str = "cpu"
    shared_server: str | None = None
    """SGLang: the one server every run uses (started once; a worker loads v0 on start)."""
    checkpoint_every: int = 1
    eta_max: int = 8
    """``staleness.eta_max`` of the ``auto`` run (the largest fixed eta of the sweep)."""
    weight_sync: str = "disk"
    """``trainer.weight_sync`` of every run (``ipc``: the worker offers the run's server, on
    this host, to the trainer's in-memory hand-over)."""

    bare_decode: bool = False
    """After the generation ceiling, drive its server bare at the worker's concurrency
    (``benchmarks.pipeline.bare``) for the ``worker_vs_bare`` ratio."""
    bare_measure_s: float = 20.0
    warmup_steps: int | None = None
    """Steps (and first batches) left out of every window; default ``max(1, steps // 10)``."""

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    def bare_spec(self) -> BareSpec:
        from rollout_workers.tasks import get_task

        task = get_task(self.spec["task"], **self.spec["options"])
        return BareSpec(
            task=task,
            n_samples=self.n_samples,
            concurrency=self.spec["max_inflight_groups"] * self.n_samples,
            max_new_tokens=self.spec["max_new_tokens"] or task.max_new_tokens,
            measure_s=self.bare_measure_s,
        )


def write_config(s: Setup, *, url: str, run: str, run_dir: Path, eta: int | str) -> Path:
    """Write ``RUN_DIR/run.yaml``, the config every process of one run reads; returns its path."""
    import yaml

    spec = s.spec
    rollout: dict[str, Any] = {
        "n_samples": s.n_samples,
        "max_inflight_groups": spec["max_inflight_groups"],
        "log_every": 10_000,
        "metrics_interval_s": 1.0,
        "on_run_finished": "wait",  # the runner stops the worker once it has sampled the run
        "ipc_given_servers": s.weight_sync == "ipc",  # the bench started the server itself
    }
    if spec["max_new_tokens"] is not None:
        rollout["max_new_tokens"] = spec["max_new_tokens"]
    cfg = {
        "redis": {"url": url},
        "run": {"name": run, "dir": str(run_dir), "seed": 0},
        "staleness": {"eta": eta, "batch_groups": s.batch_groups}
        # auto decides every 3 steps here (default 8): a bench run is only tens of steps
        | (
            {"eta_max": s.eta_max, "auto_window": 3, "auto_retry_after": 3} if eta == "auto" else {}
        ),
        "model": {"path": str(s.model)},
        "task": {"name": spec["task"], "options": spec["options"]},
        "inference": {"engine": s.engine, "threads": len(s.placement.inference)},
        "rollout": rollout,
        "trainer": {
            "device": "cpu" if s.engine == "cpu" else "cuda",
            "threads": len(s.placement.training),
            "max_steps": s.steps,
            # Acks go with checkpoints: the Redis bound's (eta + 1 + checkpoint_every) uses it.
            "checkpoint_every": s.checkpoint_every,
            "keep_checkpoints": 1,
            "keep_weights": 3,
            "weight_sync": s.weight_sync,
            **spec.get("trainer", {}),
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
