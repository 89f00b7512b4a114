"""``sluice.runconfig``: the trainer records its resolved config once per distinct config
(``config.yaml``, then ``config.resume-N.yaml``), never a secret; a worker's record is the same
resolved, redacted YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

from sluice.config import load_config, validate_config
from sluice.runconfig import (
    REDACTED,
    record_trainer_config,
    redacted,
    resolved_config,
    worker_config_text,
    write_config_file,
)


def _cfg(tmp: Path, *overrides: str) -> object:
    model = tmp / "ckpt" / "step-00000004" / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    (model.parent / "state.json").write_text("{}")
    return load_config(
        None,
        [
            f"run.dir={tmp / 'run'}",
            "run.name=r1",
            f"model.path={model.parent}",
            "redis.url=redis://user:s3cret@127.0.0.1:6399/0",
            "inference.admin_api_key=k3y",
            "task.name=reverse",
            "staleness.eta=3",
            *overrides,
        ],
    )


def test_resolved_config_is_absolute_and_without_the_password(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    r = resolved_config(cfg)  # type: ignore[arg-type]
    assert r.run.dir == str((tmp_path / "run").resolve())
    # a checkpoint dir as model.path is recorded as the model/ dir the process loaded
    assert r.model.path == str((tmp_path / "ckpt" / "step-00000004" / "model").resolve())
    assert r.redis.url == "redis://user@127.0.0.1:6399/0"
    assert r.inference.admin_api_key == "k3y"  # resolving keeps it; redacting removes it
    assert redacted(r).inference.admin_api_key == REDACTED


def test_trainer_records_config_yaml_then_only_new_configs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path, written = record_trainer_config(_cfg(tmp_path))  # type: ignore[arg-type]
    assert (path, written) == (run / "config.yaml", True)
    text = path.read_text()
    assert text.startswith("# written by sluice train")
    assert "s3cret" not in text and "k3y" not in text
    data = yaml.safe_load(text)
    assert data["task"]["name"] == "reverse" and data["staleness"]["eta"] == 3
    assert data["inference"]["admin_api_key"] == REDACTED

    # a resumed trainer with the same config: nothing new
    assert record_trainer_config(_cfg(tmp_path)) == (run / "config.yaml", False)  # type: ignore[arg-type]
    # a different one goes beside it; config.yaml is kept as it was
    p1, w1 = record_trainer_config(_cfg(tmp_path, "trainer.lr=0.5"))  # type: ignore[arg-type]
    assert (p1, w1) == (run / "config.resume-1.yaml", True)
    assert path.read_text() == text
    assert yaml.safe_load(p1.read_text())["trainer"]["lr"] == 0.5
    # ... once: the same again is found in config.resume-1.yaml; another makes resume-2
    assert record_trainer_config(_cfg(tmp_path, "trainer.lr=0.5")) == (p1, False)  # type: ignore[arg-type]
    p2, _ = record_trainer_config(_cfg(tmp_path, "trainer.lr=0.25"))  # type: ignore[arg-type]
    assert p2 == run / "config.resume-2.yaml"
    assert record_trainer_config(_cfg(tmp_path)) == (run / "config.yaml", False)  # type: ignore[arg-type]
    assert sorted(p.name for p in run.iterdir()) == [
        "config.resume-1.yaml",
        "config.resume-2.yaml",
        "config.yaml",
    ]


def test_a_demo_written_config_with_its_key_is_the_same_config(tmp_path: Path) -> None:
    """The demo's children read RUN_DIR/config.yaml (admin key included): their trainer, started
    from that file, finds its config already recorded."""
    cfg = resolved_config(_cfg(tmp_path))  # type: ignore[arg-type]
    demo_file = write_config_file(tmp_path / "run" / "config.yaml", cfg, "written by sluice demo")
    assert "k3y" in demo_file.read_text()
    from_file = validate_config(yaml.safe_load(demo_file.read_text()), None, "x")
    assert record_trainer_config(from_file) == (demo_file, False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


def test_an_unreadable_config_yaml_is_kept_and_the_config_goes_beside_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("hand-written notes, not a config\n")
    path, written = record_trainer_config(_cfg(tmp_path))  # type: ignore[arg-type]
    assert (path, written) == (run / "config.resume-1.yaml", True)
    assert (run / "config.yaml").read_text() == "hand-written notes, not a config\n"


def test_worker_record_is_resolved_and_redacted(tmp_path: Path) -> None:
    text = worker_config_text(_cfg(tmp_path), "host-42")  # type: ignore[arg-type]
    assert text.startswith("# worker host-42: written by sluice rollout")
    assert "s3cret" not in text and "k3y" not in text
    data = yaml.safe_load(text)
    assert data["run"]["name"] == "r1" and data["redis"]["url"] == "redis://user@127.0.0.1:6399/0"
    assert data["model"]["path"].endswith("step-00000004/model")
