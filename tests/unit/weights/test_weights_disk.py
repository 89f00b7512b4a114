"""``weights.disk``: a model directory appears complete or not at all; ``prune`` keeps the
newest numbered directories and never the protected one."""

from __future__ import annotations

from pathlib import Path

import pytest

from weights.disk import numbered_dirs, prune, write_model_dir


class _Model:
    """Stands in for an HF model: ``save_pretrained`` writes two files."""

    def save_pretrained(self, path: str, safe_serialization: bool) -> None:
        assert safe_serialization
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        (Path(path) / "model.safetensors").write_bytes(b"w")


class _Crash(Exception):
    pass


def test_write_model_dir_is_complete_when_it_appears(tmp_path: Path) -> None:
    dest = write_model_dir(_Model(), tmp_path / "weights" / "v1")
    assert dest == tmp_path / "weights" / "v1"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in dest.parent.iterdir()] == ["v1"]  # no temporary left behind


def test_a_crash_before_the_rename_leaves_no_version_dir(tmp_path: Path) -> None:
    def crash(point: str) -> None:
        assert point == "mid_publish"
        raise _Crash

    with pytest.raises(_Crash):
        write_model_dir(_Model(), tmp_path / "v2", crash_hook=crash)
    assert not (tmp_path / "v2").exists()
    assert numbered_dirs(tmp_path, "v") == []  # only the temporary ".tmp-v2-<pid>"


def test_write_model_dir_replaces_an_unpublished_dir(tmp_path: Path) -> None:
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "stale").write_text("x")
    write_model_dir(_Model(), tmp_path / "v3")
    assert not (tmp_path / "v3" / "stale").exists()


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    for n in (1, 2, 10, 3):
        (tmp_path / f"step-{n}").mkdir()
    (tmp_path / "step-x").mkdir()  # not numbered: never touched
    removed = prune(tmp_path, "step-", keep=2, protect=tmp_path / "step-1")
    # numeric order 1, 2, 3, 10: keep 3 and 10; 1 is protected, 2 goes
    assert removed == [tmp_path / "step-2"]
    assert [n for n, _ in numbered_dirs(tmp_path, "step-")] == [1, 3, 10]
    assert (tmp_path / "step-x").is_dir()
