"""The ``trainer`` section of the run config (the loss settings come from ``staleness.config``),
the explicit arguments the trainer takes besides it, and the trainer's start-up error.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from staleness.auto_eta import AutoEtaSettings
from staleness.config import LossConfig

Tracker = Literal["jsonl", "tensorboard", "wandb"]


def _jsonl_only() -> list[Tracker]:
    return ["jsonl"]


class LoraConfig(BaseModel):
    """``trainer.lora``: train a LoRA adapter on the frozen base model (``peft``) instead of
    every weight. ``rank: 0`` (the default) is full fine-tuning."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(
        0,
        ge=0,
        le=1024,
        description="LoRA rank r (0: off, full fine-tuning). With r > 0 only the adapter is "
        "trained, checkpointed and published (docs/weight-sync.md, LoRA).",
    )
    alpha: int | None = Field(
        None,
        gt=0,
        description="LoRA alpha (an int, as PEFT's lora_alpha): the update is scaled by "
        "alpha / rank (None: 2 * rank).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input, in the gradient pass only (the proximal "
        "recompute and the servers see none).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names (suffixes) that get an adapter, e.g. [q_proj, v_proj]; "
        "all-linear: every linear layer but the output head.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> int:
        """The alpha used: ``alpha``, or ``2 * rank`` when unset."""
        return self.alpha if self.alpha is not None else 2 * self.rank


class TrainerConfig(LossConfig):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapter training (rank 0: off)."
    )

    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: int = Field(100, ge=1, description="Train steps before the trainer stops.")
    normalize_adv_std: bool = Field(
        True, description="GRPO: divide advantages by the group's reward std."
    )
    prox_logp: Literal["recompute", "behaviour"] = Field(
        "recompute",
        description="Proximal log-probs: recomputed by one no-grad forward pass, or the behaviour ones.",
    )
    micro_batch_tokens: int = Field(16384, ge=1, description="Token budget per micro-batch.")
    publish_every: int = Field(1, ge=1, description="Publish weights every N steps.")
    keep_weights: int = Field(3, ge=1, description="Weight versions kept on disk.")
    checkpoint_every: int = Field(
        10, ge=1, description="Checkpoint every N steps (bounds replay after a crash)."
    )
    async_checkpoint: bool = Field(
        True,
        description="Write checkpoints in the background (one trainer process): the step pays "
        "only the copy to host memory; its groups are acked once the files are durable.",
    )
    reclaim_idle_ms: int = Field(
        60_000, ge=1, description="Reclaim groups pending on a consumer idle this long."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Data parallelism under torchrun: ddp (every rank holds the full weights, "
        "gradients and AdamW state) or fsdp (FSDP2: each rank holds 1/N of them; bf16 compute "
        "on CUDA; trainer/fsdp.py). fsdp also runs as one process, on a one-rank group.",
    )
    cudnn_attention: bool = Field(
        False,
        description="Let torch's attention use cuDNN on CUDA. Off by default: cuDNN builds a plan "
        "for every new sequence shape, and RL batches change shape every step (167M on an H200: "
        "0.61 s per step with it, 0.20 s without, on lengths drawn anew each step).",
    )
    threads: int | None = Field(
        None, ge=1, description="Torch threads for training (None: torch default)."
    )
    reward_target: float | None = Field(
        None, ge=0, le=1, description="Stop once the mean reward of a step reaches this."
    )
    consumer: str = Field(
        "trainer-0",
        pattern=r"^[A-Za-z0-9_.\-]{1,100}$",
        description="Stable consumer name (suffixed -r{rank} under torchrun): a restarted "
        "trainer finds its own pending groups and checkpoint under it.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    hold_max_s: float = Field(
        10.0,
        ge=0,
        description="Longest a step waits for groups that would otherwise expire (pass eta "
        "before a later step could take them), when it has a full batch of others: the wait "
        "that makes over-stale drops vanish (docs/staleness.md). 0: never wait for them.",
    )
    wait_log_s: float = Field(
        30.0, gt=0, description="Log a line every this many seconds while waiting for data."
    )
    weight_sync: Literal["disk", "distributed", "ipc"] = Field(
        "disk",
        description="How new weights reach the servers: disk (safetensors dir per version), "
        "distributed (broadcast from the trainer to the servers) or ipc (the trainer hands its "
        "weights in memory to the servers workers launched on its own host: "
        "/update_weights_from_tensor, CUDA IPC on a GPU; docs/weight-sync.md).",
    )
    publish_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the published weights: auto = bfloat16 when training on CUDA (the "
        "forward runs under bf16 autocast and GPU servers serve bf16; half the bytes of fp32), "
        "float32 on the CPU (the CPU server computes in fp32, so its log-probs match the "
        "trainer's exactly). Checkpoints always keep the fp32 master weights.",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="The device's dense bf16 peak, for the MFU in metrics.jsonl (None: known "
        "GPUs by name, e.g. H100/H200 989; no MFU on the CPU).",
    )
    bucket_mb: int = Field(
        256,
        ge=1,
        le=65536,
        description="distributed, ipc: MiB of parameters per transfer bucket (ipc: in the "
        "published dtype; the trainer's extra memory is one bucket).",
    )
    disk_every: int = Field(
        10,
        ge=1,
        description="distributed, ipc: also write the disk copy every N versions (the "
        "catch-up source of restarted servers).",
    )
    sync_master_addr: str = Field(
        "127.0.0.1", min_length=1, description="distributed: address the servers reach rank 0 at."
    )
    sync_port: int = Field(
        0, ge=0, le=65535, description="distributed: rendezvous port (0: pick a free one)."
    )
    trackers: list[Tracker] = Field(
        default_factory=_jsonl_only,
        description="Metrics sinks, all named after run.name: jsonl (RUN_DIR/metrics.jsonl, "
        "always written: the report reads it), tensorboard (RUN_DIR/tensorboard), wandb "
        "(RUN_DIR/wandb; needs `pip install 'sluice[tracking]'`). The trainer writes its step "
        "rows, the workers' summed counters and the evals (trainer/, rollout/, eval/).",
    )
    wandb_project: str = Field("sluice", min_length=1, description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (None: your default).")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="W&B mode: offline (no network; `wandb sync RUN_DIR/wandb/offline-run-*` "
        "uploads later) or online.",
    )
    sync_timeout_s: float = Field(
        60.0,
        gt=0,
        description="distributed, ipc: seconds to wait for servers to join, acknowledge "
        "or receive.",
    )


@dataclass(frozen=True)
class TrainerArgs:
    """What the trainer takes from outside its own section (``sluice.commands.train`` composes
    it from the run file)."""

    run_name: str
    """The run (Redis namespace ``sluice:{run_name}:...``)."""
    run_dir: Path
    """Where ``weights/``, ``checkpoints/`` and ``metrics.jsonl`` go."""
    seed: int
    """Seeds torch before the version-0 model is loaded (a resumed run restores its RNG)."""
    redis_url: str
    model_path: str
    """The version-0 weights: an HF causal-LM dir with safetensors ('' when not set)."""
    batch_groups: int
    """Groups per train step over all ranks (``staleness.batch_groups``)."""
    eta: int
    """The staleness limit the trainer creates the run with when it does not exist yet, and
    reads when the run's settings hold none; otherwise the run's own (live) value rules."""
    temperature: float
    """The sampling temperature (``rollout.temperature``): log-probs are taken at it."""
    admin_api_key: str | None = field(default=None, repr=False)
    """The inference servers' admin key (``inference.admin_api_key``): ``weight_sync=ipc``
    calls the servers' ``/update_weights_from_tensor`` with it."""
    eta_auto: AutoEtaSettings | None = None
    """``staleness.eta: auto``'s settings: rank 0 picks the run's eta live
    (``staleness.auto_eta``); None: eta stays what the run says."""


class TrainerError(RuntimeError):
    """A trainer setting or run state that prevents starting; the message says what to do."""


class TrainerEnvironmentError(TrainerError):
    """The machine lacks what a setting asks for (``trainer.device=cuda`` without CUDA): an
    environment problem, not a bad input (the command exits 1, not 2)."""
