"""Config sections owned by the rollout workers: the task and the ``rollout`` section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        "reverse",
        description="Task: reverse | long-tail | jsonl | text (built in) or a registered name.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Task options, e.g. {n_digits: 4} for reverse, {path: data.jsonl, reward: "
        "mod:fn, eos_token_id: 2} for jsonl; `sluice config show --set task.name=NAME` lists a "
        "task's options with their meaning and defaults.",
    )


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_samples: int = Field(8, ge=1, le=4096, description="Samples per group (GRPO group size).")
    max_inflight_groups: int = Field(
        8, ge=1, le=100_000, description="Groups generated concurrently per worker."
    )
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Top-k (-1 = whole vocabulary).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Output budget per sample (default: the task's)."
    )
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="Prompt lease TTL: prompts held by a dead worker are served again after it.",
    )
    heartbeat_ttl_s: float = Field(
        15.0, gt=0, description="Worker heartbeat TTL: a silent worker's slots are reaped after it."
    )
    server_wait_s: float = Field(
        120.0,
        ge=0,
        le=86_400,
        description="At start-up, seconds to wait for one of the worker's inference servers to "
        "answer /health (it logs the URLs it waits for every 10 s, heart-beating meanwhile); "
        "then it exits 1 naming them.",
    )
    on_run_finished: Literal["exit", "wait"] = Field(
        "exit",
        description="When the trainer ends the run (max_steps or reward_target): exit = the "
        "worker exits 0; wait = it stays, blocked at the gate, until a trainer starts the run "
        "again (`sluice train --resume`). A worker started on an already finished run waits "
        "either way.",
    )
    after_max_groups: Literal["exit", "follow"] = Field(
        "exit",
        description="With `sluice rollout --max-groups N`: exit = the worker exits 0 once it "
        "has pushed N groups; follow = it stops generating but keeps loading every new "
        "version into its servers (and answering ipc hand-overs) until it is stopped or the "
        "run finishes (benchmarks: a training ceiling with weights delivered over ipc).",
    )
    ipc_given_servers: bool = Field(
        False,
        description="trainer.weight_sync=ipc: also offer the --servers URLs (loopback URLs of "
        "servers on this host that you started yourself) to the trainer's in-memory weight "
        "hand-over, as launched servers are. The hand-over maps the trainer's GPU memory "
        "into the server: only for servers you trust as much as the trainer.",
    )
    reward_timeout_s: float = Field(
        30.0, gt=0, description="A reward call slower than this rejects the group."
    )
    reward_fn: str | None = Field(
        None,
        description="module:function overriding the task's reward (for the text task also a "
        "built-in: exact | numeric | math); the module is found on PYTHONPATH, beside the run "
        "config file or in the current directory.",
    )
    reward_processes: int = Field(
        0,
        ge=0,
        le=256,
        description="Run the reward in a pool of this many processes (CPU-heavy verifiers such "
        "as math); 0 = a thread pool in the worker (an async def reward runs on its loop).",
    )
    dynamic_sampling: bool | None = Field(
        None,
        description="Drop groups whose rewards are all equal (zero variance: no GRPO signal) "
        "at the worker before they are pushed; their admission slots are handed back "
        "(reason zero_variance) and they are counted per step and in `sluice status`. None = "
        "on for tasks that score text (the text task), off for the synthetic built-ins.",
    )
    episode: str | None = Field(
        None,
        description="module:function of an `async def episode(ctx, row) -> reward` that drives "
        "a multi-turn, tool-using episode (docs/agents.md); None = one sample per row, scored "
        "by the task's reward.",
    )
    episode_max_turns: int = Field(
        8, ge=1, le=10_000, description="Model turns (ctx.generate calls) per episode."
    )
    episode_max_tokens: int = Field(
        2048,
        ge=1,
        le=1 << 20,
        description="Tokens an episode may add after the prompt, sampled and appended together.",
    )
    episode_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Wall time of one episode; past it the group is handed back (episode_timeout).",
    )
    openai_endpoint: bool = Field(
        False,
        description="Serve an OpenAI-compatible /v1/chat/completions for the worker's episodes "
        "(ctx.openai_base_url; docs/agents.md): an agent written against the OpenAI client "
        "is trained unchanged.",
    )
    openai_host: str = Field("127.0.0.1", description="Address the endpoint listens on.")
    openai_port: int = Field(0, ge=0, le=65535, description="Its port (0 = a free one).")
    eval_every: int = Field(
        0, ge=0, description="Evaluate held-out prompts every N versions (0 = never)."
    )
    eval_prompts: int = Field(
        64, ge=1, le=100_000, description="Eval prompts per evaluation (the task's first N)."
    )
    update_mode: Literal["abort_all", "pause"] = Field(
        "abort_all",
        description="Weight update: abort_all = one update_weights_from_disk(abort_all_requests) "
        "per server (fast); pause = pause -> update -> continue (servers shared by other clients).",
    )
    ignore_eos: bool = Field(
        False, description="Generate max_new_tokens every time (benchmarks, interruption tests)."
    )
    health_interval_s: float = Field(
        1.0, gt=0, le=600, description="Seconds between server health polls."
    )
    log_every: int = Field(
        50, ge=1, description="One JSON metrics line on stderr per this many pushed groups."
    )
    metrics_interval_s: float = Field(
        2.0, gt=0, le=600, description="Seconds between metrics writes to Redis."
    )
    shutdown_grace_s: float = Field(
        10.0,
        gt=0,
        le=25,
        description="On SIGTERM, seconds to let aborted groups hand back their slots before "
        "cancelling them (exit stays within 30 s).",
    )
