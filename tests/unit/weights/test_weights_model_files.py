"""``weights.disk.model_files`` and their copy: every published weights dir and checkpoint
``model/`` carries the starting model's non-weight files byte for byte, never its weights, and
never in place of what ``save_pretrained`` wrote."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from weights.disk import MODEL_FILE_MAX_BYTES, copy_model_files, model_files, write_model_dir
from weights.publish import DiskPublisher


class _Model:
    """Stands in for an HF model: ``save_pretrained`` writes config.json and the weights."""

    def save_pretrained(self, path: str, safe_serialization: bool) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text('{"saved": true}')
        (Path(path) / "model.safetensors").write_bytes(b"new weights")


class _Records:
    def __init__(self) -> None:
        self.published: list[tuple[int, str]] = []

    async def publish_weights(self, version: int, location: str, fmt: str = "safetensors") -> str:
        self.published.append((version, location))
        return "1-0"

    async def record_disk_weights(
        self, version: int, location: str, fmt: str = "safetensors"
    ) -> bool:
        return True


TOKENIZER_FILES = {
    "tokenizer.json": '{"model": {"vocab": {"a": 0}}}',
    "tokenizer_config.json": '{"bos_token": "<s>"}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
    "vocab.json": '{"a": 0}',
    "merges.txt": "#version: 0.2\na b\n",
    "tokenizer.model": "\x00\x01sentencepiece",
    "generation_config.json": '{"eos_token_id": 2}',
    "chat_template.jinja": "{{ messages }}",
}


def _source(tmp: Path) -> Path:
    src = tmp / "base"
    src.mkdir()
    for name, text in TOKENIZER_FILES.items():
        (src / name).write_text(text)
    (src / "config.json").write_text('{"source": true}')
    for weights in (
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "consolidated.pth",
        "model.gguf",
    ):
        (src / weights).write_bytes(b"old weights")
    (src / ".gitattributes").write_text("*.bin filter=lfs")
    (src / "original").mkdir()  # a subdirectory (e.g. other-format weights): not copied
    (src / "original" / "tokenizer.model").write_text("nested")
    return src


def test_model_files_are_the_top_level_non_weight_files(tmp_path: Path) -> None:
    src = _source(tmp_path)
    names = [p.name for p in model_files(src)]
    assert names == sorted([*TOKENIZER_FILES, "config.json"])
    assert model_files(None) == [] and model_files(tmp_path / "missing") == []


def test_a_file_over_the_size_limit_is_left_out(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    big = src / "unknown_format.data"
    with big.open("wb") as f:  # sparse: no real disk use
        f.truncate(MODEL_FILE_MAX_BYTES + 1)
    (src / "tokenizer.json").write_text("{}")
    assert [p.name for p in model_files(src)] == ["tokenizer.json"]
    os.remove(big)


def test_copies_are_byte_identical_and_never_replace_what_was_saved(tmp_path: Path) -> None:
    src = _source(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").write_text('{"saved": true}')
    copied = copy_model_files(model_files(src), dest)
    assert sorted(p.name for p in copied) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert (dest / "config.json").read_text() == '{"saved": true}'


def test_write_model_dir_and_the_disk_publisher_carry_the_files(tmp_path: Path) -> None:
    src = _source(tmp_path)
    v1 = write_model_dir(_Model(), tmp_path / "w" / "v1", files=model_files(src))
    assert sorted(p.name for p in v1.iterdir()) == sorted(
        [*TOKENIZER_FILES, "config.json", "model.safetensors"]
    )
    assert (v1 / "model.safetensors").read_bytes() == b"new weights"

    records = _Records()
    pub = DiskPublisher(records, tmp_path / "weights", keep=2, model_dir=src)
    asyncio.run(pub.publish(1, _Model()))  # type: ignore[arg-type]
    published = Path(records.published[0][1])
    assert published == (tmp_path / "weights" / "v1").resolve()
    for name in TOKENIZER_FILES:
        assert (published / name).read_bytes() == (src / name).read_bytes()
    bare = DiskPublisher(_Records(), tmp_path / "bare", keep=2)  # no model_dir: weights only
    asyncio.run(bare.publish(1, _Model()))  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "bare" / "v1").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
