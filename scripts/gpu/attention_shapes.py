"""Does a new micro-batch shape every step (long-tail lengths, as in the pipeline) cost the
167M train step? Variants: cuDNN attention on/off, lengths rounded up to a multiple of 64, and
one fixed batch. On a GPU, from the repository root: ``OUT=DIR python3
scripts/gpu/attention_shapes.py`` (writes DIR/attention-shapes.json). Seen on an H200
(2026-12-02): 0.61 s per step with cuDNN on new shapes, 0.20 s without it or on one fixed
batch; hence ``trainer.cudnn_attention: false``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, ".")
from benchmarks.trainer_bench import SHAPES, _model
from trainer.batch import TrainSample
from trainer.config import TrainerConfig
from trainer.model import build_optimizer
from trainer.step import train_step

DEV = torch.device("cuda")
SHAPE = SHAPES["167M"]
VOCAB = SHAPE["vocab"]
TC = TrainerConfig(micro_batch_tokens=16384, lr=1e-5)
VARIANTS = (  # name, cuDNN attention, round lengths to (0: one fixed batch)
    ("default", True, 1),
    ("no-cudnn-sdp", False, 1),
    ("round64", True, 64),
    ("round64-no-cudnn", False, 64),
    ("same-shape", True, 0),
)


def samples(seed: int, round_to: int = 1) -> list[TrainSample]:
    """128 samples: 8 prompt tokens, outputs lognormal (median 64, sigma 1, 9..513)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(128):
        t = int(min(513, max(9, rng.lognormal(np.log(64), 1.0))))
        if round_to > 1:
            t += (-(8 + t)) % round_to
        out.append(
            TrainSample(
                group_id=f"g{i // 8}",
                prompt_ids=rng.integers(3, VOCAB, 8).astype(np.int64),
                output_ids=rng.integers(3, VOCAB, t).astype(np.int64),
                behaviour_logp=np.full(t, -np.log(VOCAB), dtype=np.float32),
                token_versions=np.zeros(t, dtype=np.int64),
                advantage=float(rng.standard_normal()),
                reward=0.5,
            )
        )
    return out


def main() -> None:
    res = {}
    for name, cudnn, rnd in VARIANTS:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        model = _model(SHAPE, DEV)
        opt, sched = build_optimizer(model, TC)
        fixed = samples(0)
        times, toks = [], []
        for k in range(14):
            batch = fixed if rnd == 0 else samples(100 + k, rnd)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(model, opt, sched, batch, TC, temperature=1.0, device=DEV, current_version=0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            toks.append(sum(s.length for s in batch))
        t = times[4:]  # the first 4 steps are warm-up
        res[name] = {
            "step_s_mean": sum(t) / len(t),
            "step_s": [round(x, 3) for x in times],
            "seq_tokens_mean": sum(toks[4:]) / len(t),
            "tok_per_s": sum(toks[4:]) / sum(t),
        }
        print(name, json.dumps(res[name]), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    Path(os.environ["OUT"], "attention-shapes.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
