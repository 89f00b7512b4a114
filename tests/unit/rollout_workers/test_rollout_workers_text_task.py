"""The text task: JSONL, Parquet and saved ``datasets`` read the same; bad rows fail as
FILE:ROW; the chat template is applied exactly as transformers applies it; stop ids come from
the tokenizer and the generation config; the answer is decoded up to the first stop token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inference.tokenizer import EOS_ID, build_char_tokenizer, load_tokenizer, stop_token_ids
from rollout_workers.tasks import TaskError, get_task

pytestmark = pytest.mark.timeout(60)

ROWS = [
    {"id": "a", "question": "What is 1+1?", "answer": "2", "level": 1},
    {"id": "b", "question": "What is 2+3?", "answer": "5", "level": 2},
    {"id": "c", "question": "What is 3*3?", "answer": "9", "level": 3},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(d)
    # An instruct model's second stop id lives only in its generation config.
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, 1]}))
    return d


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def text_task(path: Path, tok_dir: Path, **opts: Any) -> Any:
    base = {"prompt_field": "question", "id_field": "id", "tokenizer": str(tok_dir)}
    return get_task("text", path=str(path), **{**base, **opts})


def test_jsonl_parquet_and_saved_datasets_give_the_same_prompts(
    tmp_path: Path, tok_dir: Path
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(tmp_path / "saved"))
    opts = {"metadata_fields": ["level"]}
    a = text_task(jl, tok_dir, **opts)
    b = text_task(tmp_path / "d.parquet", tok_dir, **opts)
    c = text_task(tmp_path / "saved", tok_dir, **opts)
    assert a.prompts("train") == b.prompts("train") == c.prompts("train")
    p = a.prompts("train")[1]
    assert (p.id, p.answer, p.text, p.metadata) == ("b", "5", "What is 2+3?", {"level": 2})
    assert a.prompts("eval") == [] and [q.id for q in c.prompts("eval")] == ["a"]


@pytest.mark.parametrize(
    ("rows", "where", "message"),
    [
        ([*ROWS[:1], {"id": "x", "answer": "1"}], ":2:", "no field 'question'"),
        ([*ROWS[:1], "", "{not json"], ":3:", "not valid JSON"),
        ([*ROWS[:1], {"id": "x", "question": "  ", "answer": "1"}], ":2:", "non-empty text"),
        ([*ROWS[:1], {"id": "x", "question": "q"}], ":2:", "no field 'answer'"),
        ([*ROWS[:1], dict(ROWS[0])], ":2:", "id 'a' repeats"),
    ],
)
def test_a_bad_jsonl_row_fails_with_file_and_line(
    tmp_path: Path, tok_dir: Path, rows: list[Any], where: str, message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskError, match=message) as e:
        text_task(path, tok_dir)
    assert str(e.value).startswith(f"{path}{where}")


def test_a_bad_parquet_or_saved_row_fails_with_file_and_row(tmp_path: Path, tok_dir: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*ROWS, {"id": "d", "question": "", "answer": "0", "level": 4}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(TaskError, match=r"d\.parquet:3: 'question' must be non-empty text"):
        text_task(tmp_path / "d.parquet", tok_dir)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TaskError, match=r"saved:3: 'question' must be non-empty text"):
        text_task(tmp_path / "saved", tok_dir)


def test_missing_paths_and_directories_are_named(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(TaskError, match=r"does not exist \(nothing is downloaded"):
        text_task(tmp_path / "nope.jsonl", tok_dir)
    (tmp_path / "dir").mkdir()
    with pytest.raises(TaskError, match=r"not a dataset saved with datasets\.save_to_disk"):
        text_task(tmp_path / "dir", tok_dir)
    with pytest.raises(TaskError, match="has no tokenizer"):
        get_task("text", path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), tokenizer=str(tmp_path))


def test_the_chat_template_is_applied_as_transformers_applies_it(
    tmp_path: Path, tok_dir: Path
) -> None:
    task = text_task(write_jsonl(tmp_path / "d.jsonl", ROWS), tok_dir, system_prompt="Be brief.")
    tok = load_tokenizer(tok_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": ROWS[0]["question"]},
    ]
    want = tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert task.prompts("train")[0].input_ids == list(want)
    rendered = tok.decode(task.prompts("train")[0].input_ids)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_messages_rows_and_their_errors(tmp_path: Path, tok_dir: Path) -> None:
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv, "answer": "4"}])
    task = get_task("text", path=str(path), messages_field="messages", tokenizer=str(tok_dir))
    tok = load_tokenizer(tok_dir)
    want = tok.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    p = task.prompts("train")[0]
    assert p.input_ids == list(want) and p.text == "2+2?" and p.id == "train-0"
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}], "answer": "4"}])
    with pytest.raises(TaskError, match=r"b\.jsonl:1: 'messages' must be a non-empty list"):
        get_task("text", path=str(bad), messages_field="messages", tokenizer=str(tok_dir))


def test_stop_ids_decoding_and_the_reward_on_text(tmp_path: Path, tok_dir: Path) -> None:
    task = text_task(write_jsonl(tmp_path / "d.jsonl", ROWS), tok_dir, reward="exact")
    assert task.stop_token_ids == (EOS_ID, 1)  # tokenizer EOS, then the generation config's
    assert stop_token_ids(tok_dir, load_tokenizer(tok_dir)) == [EOS_ID, 1]
    tok = load_tokenizer(tok_dir)
    ids = tok("2", add_special_tokens=False)["input_ids"]
    out = [*ids, EOS_ID, *tok("junk", add_special_tokens=False)["input_ids"]]
    assert task.decode(out) == "2"  # up to the first stop token
    p = task.prompts("train")[0]
    assert task.reward(p, out) == 1.0 and task.reward(p, ids + ids) == 0.0


def test_eval_size_holds_out_a_seeded_disjoint_split(tmp_path: Path, tok_dir: Path) -> None:
    rows = [{"id": f"r{i}", "question": f"q{i}", "answer": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = text_task(path, tok_dir, eval_size=5, seed=1)
    b = text_task(path, tok_dir, eval_size=5, seed=1)
    c = text_task(path, tok_dir, eval_size=5, seed=2)
    ev = {p.id for p in a.prompts("eval")}
    assert len(ev) == 5 and ev.isdisjoint(p.id for p in a.prompts("train"))
    assert len(a.prompts("train")) == 15 and a.prompts("eval") == b.prompts("eval")
    assert ev != {p.id for p in c.prompts("eval")}
    with pytest.raises(TaskError, match="leaves no train rows"):
        text_task(path, tok_dir, eval_size=20)


def test_special_tokens_in_the_answer_show_unless_skipped(tmp_path: Path, tok_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tok = load_tokenizer(tok_dir)
    seven, three = (tok(c, add_special_tokens=False)["input_ids"][0] for c in "73")
    start = tok.convert_tokens_to_ids("<|im_start|>")  # special, not a stop id
    out = [seven, start, three, start, EOS_ID]
    assert text_task(path, tok_dir).decode(out) == "73"
    want = "7<|im_start|>3<|im_start|>"
    assert text_task(path, tok_dir, skip_special_tokens=False).decode(out) == want
