"""Weight-update latency: from the update call to the first token generated on the new weights.

For each model size a CPU reference server is launched and kept busy with long generations;
then, per path and trial, new weights (a different random init saved as a full HF directory)
are loaded and a 1-token generate is sent right after. Latency = update call sent → that token
returned carrying the new ``weight_version``. Paths, measured in the same run on the same
server:

* ``abort_all``: ``update_weights_from_disk(abort_all_requests=true)`` — in-flight requests
  return their partial outputs (old version) and the weights load; no pause round trip.
* ``pause``: ``pause_generation(abort)`` → ``update_weights_from_disk`` → ``continue_generation``.
* ``distributed``: gloo broadcast from this process (rank 0) into the server
  (``/init_weights_update_group`` once, then ``/update_weights_from_distributed`` per bucket),
  in flight requests aborted first; the transfer is memory to memory, no file (CPU only).
* ``ipc``: this process plays the trainer on the same host: it holds the weights (fp32; on a
  GPU, CUDA tensors on the server's GPU) and hands them over with
  ``/update_weights_from_tensor`` bucket by bucket (``weights.ipc.send_buckets``, the
  trainer's own code: bf16 copies on the GPU, CUDA IPC handles; memory-backed files on the
  CPU), ``abort_all_requests`` on the first call, the version on the last.

* ``lora``: a LoRA publication (``trainer.lora``) of each rank in ``--lora-ranks`` on every
  linear layer: the worker's own ``weights.receive.LoraReceiver`` loads the adapter directory
  (``/load_lora_adapter``, written as the trainer's ``weights.lora`` writes it: bf16 for
  SGLang, fp32 for the CPU server) under the version's name while the server keeps serving,
  then aborts the in-flight requests; the first token is a request naming the new adapter.
  The previous adapter is unloaded after the measurement (the worker does it in the
  background). Its rows give the adapter's bytes beside the full weights' (``fraction``).

Bytes/s = weight bytes / latency. On a GPU with SGLang the same client calls apply.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {  # name -> init_tiny_model shape
    "tiny": {"layers": 2, "hidden": 64, "vocab": 256},
    "10M": {"layers": 4, "hidden": 256, "vocab": 8192},
    "100M": {"layers": 12, "hidden": 768, "vocab": 16384},
    # Qwen2-0.5B's shape (494M parameters), random init: for GPU runs.
    "0.5B": {
        "layers": 24,
        "hidden": 896,
        "vocab": 151936,
        "heads": 14,
        "kv_heads": 2,
        "intermediate": 4864,
        "arch": "qwen2",
        "max_positions": 32768,
    },
}
# Flags for SGLang 0.5.17 on an H100/H200, CUDA graphs on (override with $SLUICE_SGLANG_ARGS).
PATHS = ("abort_all", "pause", "distributed", "ipc", "lora")
SGLANG_ARGS = (
    "--attention-backend triton --sampling-backend pytorch "
    "--disable-piecewise-cuda-graph --grammar-backend none --dtype bfloat16"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG of latency by model and path")
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["tiny", "10M", "100M"],
        choices=list(SIZES),
        help="model sizes (default: tiny 10M 100M; 0.5B is for GPUs)",
    )
    p.add_argument(
        "--engine",
        choices=("cpu", "sglang"),
        default="cpu",
        help="server under test (sglang: one GPU; the gloo broadcast path is CPU-only)",
    )
    p.add_argument("--mem-fraction", type=float, default=0.5, help="SGLang --mem-fraction-static")
    p.add_argument("--trials", type=int, default=3, help="updates per path and size (default 3)")
    p.add_argument("--inflight", type=int, default=4, help="long requests running during updates")
    p.add_argument(
        "--bucket-mb", type=float, default=64.0, help="distributed and ipc bucket size (MiB)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument(
        "--lora-ranks",
        nargs="+",
        type=int,
        default=[8, 16, 64],
        help="lora path: adapter ranks to measure (default 8 16 64; all linear layers)",
    )
    p.add_argument("--workdir", default=None, help="where models are written (default: a temp dir)")
    p.add_argument("--no-distributed", action="store_true", help="skip the gloo broadcast path")
    p.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=None,
        help="update paths to measure (default: all that apply: distributed only on the CPU)",
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


class _Broadcaster:
    """Rank 0 of a gloo group with the server as rank 1; broadcasts named tensors."""

    def __init__(self, port: int) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.port = port
        self.pg: Any = None
        self.store: Any = None

    def join(self) -> None:
        dist = self.dist
        self.store = dist.TCPStore(
            "127.0.0.1", self.port, 2, is_master=True, timeout=timedelta(seconds=120)
        )
        self.pg = dist.ProcessGroupGloo(
            dist.PrefixStore("weights/", self.store), 0, 2, timedelta(seconds=120)
        )

    def broadcast(self, tensors: list[Any]) -> None:
        opts = self.dist.BroadcastOptions()
        opts.rootRank = 0
        for t in tensors:
            self.pg.broadcast([t], opts).wait()


def _launch(
    name: str, args: argparse.Namespace, model: Path, work: Path, lora_rank: int = 0
) -> tuple[Any, int]:
    """The server under test on ``model`` (serving adapters up to ``lora_rank``) and how many
    bytes one version of it moves."""
    from inference.launch import launch_cpu_server

    lora: dict[str, Any] = {"lora_rank": lora_rank, "lora_target_modules": ["all-linear"]}
    params = _dir_bytes(model) // 4  # written in float32
    if args.engine == "sglang":
        import os

        from inference.launch import launch_sglang

        extra = os.environ.get("SLUICE_SGLANG_ARGS", SGLANG_ARGS).split()
        server = launch_sglang(
            model,
            mem_fraction=args.mem_fraction,
            extra_args=extra,
            log_path=work / f"{name}.log",
            timeout=900,
            **lora,
        )
        return server, params * 2  # what the server holds and moves: bfloat16
    server = launch_cpu_server(
        model, threads=args.threads, log_path=work / f"{name}.log", timeout=300, **lora
    )
    return server, params * 4


class _Swaps:
    """Timed weight swaps on one busy server, alternating between two model directories."""

    def __init__(self, client: Any, args: argparse.Namespace, dirs: list[Path], vocab: int) -> None:
        import numpy as np

        from inference.protocol import SamplingParams

        self.client, self.args, self.dirs = client, args, dirs
        self.long = SamplingParams(max_new_tokens=4000, temperature=1.0, ignore_eos=True)
        self.one = SamplingParams(max_new_tokens=1, temperature=1.0)
        rng = np.random.default_rng(0)
        self.prompt = [int(x) for x in rng.integers(3, vocab, 8)]
        self.version = 0
        self.bcast: Any = None
        self.states: list[list[tuple[str, Any]]] = []
        self.held: list[dict[str, Any]] = []
        """ipc: the weights this process holds, as a trainer would (on the GPU for SGLang)."""
        self.buckets: list[list[dict[str, Any]]] = []
        self.adapters: dict[int, list[Path]] = {}
        """lora: rank -> two adapter directories (alternated)."""
        self.served: Any = None
        """lora: the worker's record of the server (``weights.receive.Receiving``)."""

    async def join_group(self) -> None:
        """This process becomes rank 0 of a gloo group with the server (distributed path)."""
        from inference.models import load_state_dict
        from procs import free_port

        self.bcast = _Broadcaster(free_port())
        th = threading.Thread(target=self.bcast.join)
        th.start()
        await self.client.init_weights_update_group(
            "127.0.0.1", self.bcast.port, 1, 2, "weights", "gloo"
        )
        th.join(60)
        self.states = [sorted(load_state_dict(d).items()) for d in self.dirs]

    def hold(self, gpu: bool) -> None:
        """ipc: load both versions into this process (fp32; CUDA tensors when ``gpu``)."""
        from inference.models import load_state_dict
        from weights.ipc import plan_buckets

        for d in self.dirs:
            state = {
                n: (t.float().cuda() if gpu else t.float().contiguous())
                for n, t in load_state_dict(d).items()
            }
            self.held.append(state)
            self.buckets.append(plan_buckets(list(state.items()), self.args.bucket_mb, self.dtype))

    def make_adapters(self, base: Path, ranks: list[int], work: Path) -> dict[int, int]:
        """lora: two random adapters per rank over ``base``, written as the trainer publishes
        them; returns rank -> bytes of one adapter."""
        from types import SimpleNamespace

        import torch

        from trainer.config import LoraConfig
        from trainer.lora import apply_lora
        from trainer.model import load_model
        from weights.lora import ADAPTER_WEIGHTS, write_adapter_dir

        self.served = SimpleNamespace(
            url="bench", version=0, group=None, mixed=False, adapter=None, adapters=set()
        )
        sizes: dict[int, int] = {}
        for rank in ranks:
            model = apply_lora(load_model(base, torch.device("cpu")), LoraConfig(rank=rank))
            self.adapters[rank] = []
            for i in range(2):
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if ".lora_B." in n:
                            p.normal_(0, 0.01, generator=torch.Generator().manual_seed(i))
                d = write_adapter_dir(model, work / f"{base.name}-r{rank}-a{i}", dtype=self.dtype)
                self.adapters[rank].append(d)
            sizes[rank] = (self.adapters[rank][0] / ADAPTER_WEIGHTS).stat().st_size
            del model
        return sizes

    @property
    def dtype(self) -> Any:
        """What ipc sends: bf16 to SGLang (what it serves), the held fp32 to the CPU server."""
        import torch

        return torch.bfloat16 if self.args.engine == "sglang" else None

    async def first_token_on(self, v: int, lora: bool = False) -> float:
        from inference.lora import adapter_name

        while True:
            if lora:  # refused unless the adapter is loaded; labelled with its version
                res = await self.client.generate(self.prompt, self.one, lora_path=adapter_name(v))
            else:
                res = await self.client.generate(self.prompt, self.one)
            if res.weight_version == v:
                return time.perf_counter()

    async def _update(self, path: str) -> None:
        client, version = self.client, self.version
        target = str(self.dirs[version % 2])
        if path.startswith("lora-r"):
            from weights.receive import LoraReceiver

            d = self.adapters[int(path.removeprefix("lora-r"))][version % 2]
            await LoraReceiver(str(d), version).receive(client, self.served)
        elif path == "abort_all":
            await client.update_weights_from_disk(target, version, abort_all_requests=True)
        elif path == "pause":
            await client.pause("abort")
            await client.update_weights_from_disk(target, version)
            await client.resume()
        elif path == "ipc":
            from weights.ipc import send_buckets

            i = version % 2
            await send_buckets(
                [(client, 1)],
                self.held[i],
                self.buckets[i],
                version,
                dtype=self.dtype,
                timeout_s=600.0,
            )
        else:
            await client.abort()  # distributed: stop in-flight work, then stream weights
            await _distributed_update(
                client, self.bcast, self.states[version % 2], version, self.args.bucket_mb
            )

    async def timed(self, path: str) -> float:
        lora = path.startswith("lora-r")
        current = self.served.adapter if lora and self.served is not None else None
        kw = {"lora_path": current} if current else {}
        background = [
            asyncio.create_task(self.client.generate(self.prompt, self.long, **kw))
            for _ in range(self.args.inflight)
        ]
        await asyncio.sleep(0.3)  # let them get going
        self.version += 1
        t0 = time.perf_counter()
        await self._update(path)
        t1 = await self.first_token_on(self.version, lora)
        results = await asyncio.gather(*background, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
            assert r.finish_reason == "abort", r.finish_reason
        if lora:  # the previous adapter is named by no request now: unload it (untimed)
            for old in sorted(self.served.adapters - {self.served.adapter}):
                await self.client.unload_lora_adapter(old)
                self.served.adapters.discard(old)
        elif self.served is not None and self.served.adapter is not None:
            # a full-weight update: requests go back to the base until the next adapter
            self.served.adapter = None
        return t1 - t0


async def _bench_size(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from inference.models import init_tiny_model

    shape = SIZES[name]
    dirs = [init_tiny_model(work / f"{name}-v{i}", seed=i, **shape) for i in range(2)]
    params = _dir_bytes(dirs[0]) // 4  # written in float32
    paths = list(args.paths or PATHS)
    ranks = sorted(set(args.lora_ranks)) if "lora" in paths else []
    server, nbytes = _launch(name, args, dirs[0], work, max(ranks, default=0))
    rows: list[dict[str, Any]] = []
    try:
        async with server.client(timeout=600, update_timeout=600) as client:
            swaps = _Swaps(client, args, dirs, shape["vocab"])
            if args.no_distributed or (args.engine != "cpu" and args.paths is None):
                paths = [p for p in paths if p != "distributed"]
            if "distributed" in paths:
                if args.engine != "cpu":
                    raise SystemExit("sluice bench weight-sync: --paths distributed is CPU-only")
                await swaps.join_group()
            if "ipc" in paths:
                swaps.hold(gpu=args.engine == "sglang")
            sizes: dict[str, int] = {p: nbytes for p in paths if p != "lora"}
            if ranks:
                adapter_bytes = swaps.make_adapters(dirs[0], ranks, work)
                sizes.update({f"lora-r{r}": adapter_bytes[r] for r in ranks})
            for path, moved in sizes.items():
                times = [await swaps.timed(path) for _ in range(args.trials)]
                med = statistics.median(times)
                rows.append(
                    {
                        "model": name,
                        "engine": args.engine,
                        "params": params,
                        "weight_bytes": moved,
                        "full_bytes": nbytes,
                        "fraction": moved / nbytes,
                        "path": path,
                        "latency_s": med,
                        "latency_all_s": times,
                        "gb_per_s": moved / med / 1e9,
                    }
                )
    finally:
        server.stop()
    return rows


async def _distributed_update(
    client: Any, bcast: Any, state: list[tuple[str, Any]], version: int, bucket_mb: float
) -> None:
    buckets: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, t in state:
        if buckets[-1] and size + t.numel() * t.element_size() > bucket_mb * 1e6:
            buckets.append([])
            size = 0
        buckets[-1].append((name, t))
        size += t.numel() * t.element_size()
    for i, bucket in enumerate(buckets):
        th = threading.Thread(target=bcast.broadcast, args=([t.contiguous() for _, t in bucket],))
        th.start()
        last = i == len(buckets) - 1
        await client.update_weights_from_distributed(
            [n for n, _ in bucket],
            [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [list(t.shape) for _, t in bucket],
            "weights",
            version,
            flush_cache=last,
        )
        th.join(120)


def run(args: argparse.Namespace) -> int:
    import tempfile

    from benchmarks.common import machine_info, print_table, write_json

    with tempfile.TemporaryDirectory(prefix="sluice-wsync-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        for name in args.sizes:
            rows += asyncio.run(_bench_size(name, args, work))
    print_table(
        f"weight update → first token on new weights ({args.engine} server, {args.inflight} requests in "
        f"flight, median of {args.trials})",
        ["model", "params", "path", "MB moved", "% of full", "latency s", "GB/s"],
        [
            [
                r["model"],
                f"{r['params'] / 1e6:.1f}M",
                r["path"],
                round(r["weight_bytes"] / 1e6, 3),
                round(100 * r["fraction"], 2),
                round(r["latency_s"], 4),
                round(r["gb_per_s"], 3),
            ]
            for r in rows
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "weight-sync",
            "machine": machine_info(),
            "engine": args.engine,
            "results": rows,
        },
    )
    if args.plot:
        plot(rows, args.plot, f"{args.engine} server, {args.inflight} requests in flight")
    return 0


def plot(rows: list[dict[str, Any]], path: str | Path, subtitle: str) -> None:
    """Grouped bars: latency (log scale) per model size, one bar per update path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(paths)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for j, name in enumerate(paths):
        xs, ys = [], []
        for i, m in enumerate(models):
            hit = [r for r in rows if r["model"] == m and r["path"] == name]
            if hit:
                xs.append(i + (j - (len(paths) - 1) / 2) * width)
                ys.append(hit[0]["latency_s"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(models)), models)
    ax.set_yscale("log")
    ax.set_ylabel("update → first new-version token (s)")
    ax.set_title(f"weight update latency ({subtitle})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
