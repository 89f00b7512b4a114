"""The config each process of a run ran with, recorded where the run can find it.

Every sluice process composes one ``SluiceConfig`` (file + ``--set`` + flags); this module writes
it *resolved* (``run.dir`` and ``model.path`` absolute, a checkpoint ``model.path`` turned into
its ``model/`` directory, the Redis password taken out of ``redis.url``):

- ``sluice demo`` writes ``RUN_DIR/config.yaml`` before it starts anything, and every child
  reads that file (``write_config_file``; the children get the Redis password through
  ``$SLUICE_REDIS_PASSWORD``).
- ``sluice train`` (rank 0, once the trainer has started) records its config with
  ``record_trainer_config``: ``RUN_DIR/config.yaml`` when there is none; nothing when
  ``config.yaml`` or an earlier ``config.resume-N.yaml`` holds the same config (a demo's
  trainer, a ``--resume`` with the same settings); else ``config.resume-N.yaml`` beside it
  (N = 1, 2, ...), so the first config of the run is never overwritten and every later one is
  kept. ``sluice report`` reads ``config.yaml``.
- ``sluice rollout`` records its config in the run's Redis, ``keys.worker_config(run, ID)``
  (YAML text, kept ``WORKER_CONFIG_TTL_S``; ``record_worker_config``): a worker may run on a
  machine where ``run.dir`` is not the trainer's directory (distributed weight sync needs no
  shared disk), but it always reaches the run's Redis, so that is where its record can be found
  (``redis-cli GET 'sluice:{RUN}:worker:ID:config'``, or ``worker_configs``).

Recorded configs never hold a secret: the Redis password is taken out of the URL and
``inference.admin_api_key`` is written as ``REDACTED`` (a file written by the demo for its
children keeps the key, as the children need it). Two configs are "the same" when they are equal
once redacted (``same_config``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from sluice.config import ConfigError, SluiceConfig, dump_config, validate_config

REDACTED = "REDACTED"
WORKER_CONFIG_TTL_S = 7 * 24 * 3600
"""A worker's config record outlives the worker by this much (as its metrics do)."""
RESUME_RE = re.compile(r"^config\.resume-(\d+)\.yaml$")


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (None if it had none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    netloc = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), (
        parts.password
    )


def resolved_config(cfg: SluiceConfig) -> SluiceConfig:
    """A copy of ``cfg`` as the process runs it: ``run.dir`` and ``model.path`` absolute (a
    checkpoint dir as its ``model/`` directory: ``inference.models.resolve_model_dir``), the
    Redis password out of ``redis.url``."""
    from inference.models import resolve_model_dir

    out = cfg.model_copy(deep=True)
    out.run.dir = str(Path(out.run.dir).resolve())
    if out.model.path:
        out.model.path = str(resolve_model_dir(out.model.path).resolve())
    out.redis.url = split_password(out.redis.url)[0]
    return out


def redacted(cfg: SluiceConfig) -> SluiceConfig:
    """A copy of ``cfg`` without secrets (the Redis password, the servers' admin key)."""
    out = cfg.model_copy(deep=True)
    out.redis.url = split_password(out.redis.url)[0]
    if out.inference.admin_api_key is not None:
        out.inference.admin_api_key = REDACTED
    return out


def config_text(cfg: SluiceConfig, header: str) -> str:
    """``cfg`` as YAML under ``header`` (each of its lines made a comment)."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + dump_config(cfg)


def write_config_file(path: Path, cfg: SluiceConfig, header: str) -> Path:
    """Write ``cfg`` (as given: resolve and redact first where needed) to ``path`` atomically
    (a temporary file in the same directory, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.write_text(config_text(cfg, header))
    os.replace(tmp, path)
    return path


def _read(path: Path) -> SluiceConfig | None:
    """The config in ``path``, or None when it is not a valid config file."""
    try:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            return None
        return validate_config(data, None, str(path))
    except (OSError, yaml.YAMLError, ConfigError):
        return None


def same_config(a: SluiceConfig, b: SluiceConfig) -> bool:
    """Equal once secrets are taken out (a recorded config holds none)."""
    return redacted(a).model_dump(mode="json") == redacted(b).model_dump(mode="json")


def _resume_files(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in run_dir.glob("config.resume-*.yaml"):
        m = RESUME_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _who(command: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"{command} on {socket.gethostname()} (pid {os.getpid()}) at {stamp}"


def record_trainer_config(cfg: SluiceConfig) -> tuple[Path, bool]:
    """Record the trainer's config in ``run.dir`` (rules in the module docstring). Returns the
    file that holds it and whether it was written now."""
    rec = redacted(resolved_config(cfg))
    run_dir = Path(rec.run.dir)
    main = run_dir / "config.yaml"
    header = (
        f"written by {_who('sluice train')}: the resolved config the trainer ran with "
        "(secrets redacted)"
    )
    if not main.exists():
        return write_config_file(main, rec, header), True
    resumes = _resume_files(run_dir)
    for p in [main, *(p for _, p in resumes)]:
        old = _read(p)
        if old is not None and same_config(old, rec):
            return p, False
    n = resumes[-1][0] + 1 if resumes else 1
    path = run_dir / f"config.resume-{n}.yaml"
    header += f"; it differs from {main.name}"
    return write_config_file(path, rec, header), True


def worker_config_text(cfg: SluiceConfig, worker_id: str) -> str:
    """The YAML record of a worker's config (resolved, redacted)."""
    rec = redacted(resolved_config(cfg))
    return config_text(
        rec,
        f"worker {worker_id}: written by {_who('sluice rollout')}: the resolved config the "
        "worker ran with (secrets redacted)",
    )


async def record_worker_config(client: Any, cfg: SluiceConfig, worker_id: str) -> str:
    """Store the worker's config record in the run's Redis; returns its key."""
    from buffer import keys
    from buffer.connection import with_retries

    k = keys.worker_config(cfg.run.name, worker_id)
    text = worker_config_text(cfg, worker_id)
    await with_retries(
        lambda: client.set(k, text, ex=WORKER_CONFIG_TTL_S), what="record worker config"
    )
    return k


async def worker_configs(client: Any, run: str) -> dict[str, str]:
    """Every recorded worker config of ``run``: worker id -> YAML text."""
    from buffer import keys

    prefix = keys.worker_prefix(run)
    out: dict[str, str] = {}
    async for k in client.scan_iter(match=keys.worker_config(run, "*"), count=1000):
        name = k.decode() if isinstance(k, bytes) else str(k)
        raw = await client.get(k)
        if raw is None:
            continue
        with contextlib.suppress(UnicodeDecodeError):
            out[name[len(prefix) : -len(":config")]] = (
                raw.decode() if isinstance(raw, bytes) else str(raw)
            )
    return dict(sorted(out.items()))
