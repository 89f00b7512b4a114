"""One rank of the FSDP2 equivalence test (run by tests/integration/test_trainer_fsdp.py).

``python trainer_fsdp_worker.py MODEL_DIR OUT RANK WORLD INIT_FILE MODE WORKDIR``: every rank
builds the same 3 batches of 4 synthetic groups and takes groups ``rank::world`` of each; three
``train_step``s with AdamW, warm-up and clipping (the trainer's own ``build_optimizer``).

- ``plain``: one process, the unsharded model (the reference).
- ``fsdp``: the model sharded by ``trainer.fsdp.shard_model`` (gloo); after step 2 a gathered
  checkpoint is written (``checkpoint_tensors`` + ``write_checkpoint``), a fresh model and
  optimizer are restored from it (``place_optimizer_state``) and take step 3; then the weights
  are gathered for publication (``full_weights``) and rank 0 writes them in bf16 through
  ``weights.disk.write_model_dir`` to ``WORKDIR/pub``.

Rank 0 writes the final fp32 weights to ``OUT`` (safetensors), the last step's loss to
``OUT.loss`` and each rank its parameter/optimizer bytes to ``OUT.bytes{rank}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as td
from safetensors.torch import save_file
from trainer_helpers import make_group

from trainer.batch import samples_from_groups
from trainer.checkpoint import restore_training_state, snapshot_checkpoint, write_checkpoint
from trainer.config import TrainerConfig
from trainer.model import build_optimizer, load_model
from trainer.step import DistInfo, train_step

CPU = torch.device("cpu")


def main() -> None:
    model_dir, out, rank, world, init, mode, workdir = sys.argv[1:8]
    r, w = int(rank), int(world)
    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    batches = [[make_group(rng, "fsdp", n=4) for _ in range(4)] for _ in range(3)]
    tc = TrainerConfig(
        is_mode="truncate", is_cap=2.0, micro_batch_tokens=24, lr=1e-2, warmup_steps=2
    )
    dist = DistInfo(r, w)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, i: int) -> float:
        stats = train_step(
            model,
            opt,
            sched,
            samples_from_groups(batches[i][r::w]),
            tc,
            temperature=1.0,
            device=CPU,
            current_version=None,
            dist=dist,
        )
        return stats.loss

    if mode == "plain":
        model = load_model(Path(model_dir), CPU)
        opt, sched = build_optimizer(model, tc)
        for i in range(3):
            loss = step(model, opt, sched, i)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        Path(out + ".loss").write_text(repr(loss))
        return

    from trainer.fsdp import (
        checkpoint_tensors,
        full_weights,
        local_bytes,
        place_optimizer_state,
        shard_model,
    )
    from weights.disk import write_model_dir

    td.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=w)
    model = shard_model(load_model(Path(model_dir), CPU), CPU)
    opt, sched = build_optimizer(model, tc)
    for i in range(2):
        step(model, opt, sched, i)
    gathered = checkpoint_tensors(model, opt, r)
    ckpt = Path(workdir) / "ckpt"
    if r == 0:
        snap = snapshot_checkpoint(
            model=model, optimizer=opt, scheduler=sched, state={"step": 2}, gathered=gathered
        )
        write_checkpoint(snap, ckpt)
    td.barrier()
    del model, opt, sched, gathered
    model = shard_model(load_model(ckpt / "model", CPU), CPU)
    opt, sched = build_optimizer(model, tc)
    restore_training_state(ckpt, opt, sched, place_optimizer_state)
    loss = step(model, opt, sched, 2)
    Path(f"{out}.bytes{r}").write_text(json.dumps(local_bytes(model, opt)))
    full = full_weights(model, None, r)
    pub = full_weights(model, torch.bfloat16, r)
    if r == 0:
        assert full is not None and pub is not None
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, out)
        Path(out + ".loss").write_text(repr(loss))
        write_model_dir(pub, Path(workdir) / "pub", dtype=torch.bfloat16)
    td.destroy_process_group()


if __name__ == "__main__":
    main()
