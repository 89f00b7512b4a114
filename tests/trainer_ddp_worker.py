"""One rank of the data-parallel equivalence test (run by tests/integration/test_trainer_ddp.py).

``python trainer_ddp_worker.py MODEL_DIR OUT RANK WORLD INIT_FILE``: every rank builds the same
6 synthetic groups, takes groups ``rank::world``, runs one ``train_step`` under
DistributedDataParallel (gloo) and rank 0 writes the updated weights to ``OUT`` (safetensors).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as td
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from trainer_helpers import make_group
from transformers import AutoModelForCausalLM

from trainer.batch import samples_from_groups
from trainer.config import TrainerConfig
from trainer.step import DistInfo, train_step


def main() -> None:
    model_dir, out, rank, world, init = sys.argv[1:6]
    r, w = int(rank), int(world)
    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=w)
    rng = np.random.default_rng(5)
    groups = [make_group(rng, "ddp", n=4) for _ in range(6)]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, use_safetensors=True, dtype=torch.float32
    )
    wrapped = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    # token_mean over the whole batch; micro-batches of a few samples on each rank
    settings = TrainerConfig(is_mode="truncate", is_cap=2.0, micro_batch_tokens=24)
    stats = train_step(
        wrapped,
        opt,
        None,
        samples_from_groups(groups[r::w]),
        settings,
        temperature=1.0,
        device=torch.device("cpu"),
        current_version=None,
        dist=DistInfo(r, w),
    )
    if r == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        Path(out + ".loss").write_text(repr(stats.loss))
    td.destroy_process_group()


if __name__ == "__main__":
    main()
