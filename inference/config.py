"""Config sections owned by ``inference``: the engine and the model directory it serves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str = Field(
        "",
        description="Hugging Face causal-LM directory (config.json + safetensors). Empty: the run "
        "creates a tiny random-init model for the task under RUN_DIR/model.",
    )
    layers: int = Field(2, ge=1, le=64, description="Tiny model layers (when path is empty).")
    hidden: int = Field(
        64, ge=8, le=8192, description="Tiny model hidden size (when path is empty)."
    )
    heads: int = Field(
        4, ge=1, le=128, description="Tiny model attention heads (when path is empty)."
    )
    arch: Literal["llama", "qwen2"] = Field("llama", description="Tiny model architecture.")
    alphabet: str = Field(
        "",
        max_length=4096,
        description="Tiny model for a text task (when path is empty): the characters of its "
        "character-level tokenizer ('' = printable ASCII and newline); a character outside it "
        "encodes as <unk>.",
    )
    chat_template: Literal["chatml", "compact"] = Field(
        "chatml",
        description="Tiny model for a text task (when path is empty): its chat template. chatml: "
        "<|im_start|>ROLE\\nCONTENT<|im_end|>\\n per message; compact: <|im_start|>CONTENT"
        "<|im_end|> (no roles, no newlines: what a turn copies sits a few tokens back, which a "
        "random-init model learns much sooner).",
    )


class InferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: Literal["auto", "sglang", "cpu"] = Field(
        "auto",
        description="Inference engine: sglang (GPU), cpu (reference server), auto = sglang when it imports and CUDA is present.",
    )
    servers: list[str] = Field(
        default_factory=list, description="URLs of running inference servers (empty: launch them)."
    )
    launch: int = Field(1, ge=0, le=64, description="Servers to launch when `servers` is empty.")
    threads: int = Field(1, ge=1, le=256, description="Torch threads per CPU server.")
    mem_fraction: float | None = Field(
        None, gt=0, le=1, description="SGLang --mem-fraction-static."
    )
    tp_size: int = Field(1, ge=1, le=64, description="SGLang tensor-parallel size.")
    deterministic: bool = Field(False, description="SGLang --enable-deterministic-inference.")
    admin_api_key: str | None = Field(
        None, description="SGLang --admin-api-key (sent as a Bearer token)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra server launch arguments."
    )
