"""inference/cpu_server/sampling.py: request validation and the sampling rule, without a model
or a server (the same checks over HTTP are in tests/integration/test_cpu_server.py)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch

from inference.cpu_server.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    BadRequest,
    Req,
    Sampling,
    generate_response,
    parse_generate,
    parse_json_object,
    parse_sampling,
    sample_rows,
)

VOCAB = 10


def test_sampling_defaults_are_sglangs() -> None:
    assert parse_sampling(None, VOCAB) == Sampling()
    assert parse_sampling({}, VOCAB) == Sampling(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    s = parse_sampling(
        {"max_new_tokens": 0, "temperature": 0, "top_p": 0.5, "top_k": 3, "ignore_eos": True},
        VOCAB,
    )
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.ignore_eos) == (
        0,
        0.0,
        0.5,
        3,
        True,
    )
    assert isinstance(s.temperature, float)
    s = parse_sampling({"stop_token_ids": [1, 9], "sampling_seed": 0, "top_k": None}, VOCAB)
    assert s.stop_token_ids == frozenset({1, 9}) and s.sampling_seed == 0 and s.top_k == -1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1], "sampling_params must be an object, got list"),
        ({"temp": 1}, "unknown sampling_params key(s) ['temp']"),
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative integer, got -1"),
        ({"max_new_tokens": True}, "max_new_tokens must be a non-negative integer, got True"),
        ({"temperature": math.inf}, "temperature must be a non-negative finite number, got inf"),
        ({"temperature": -0.1}, "temperature must be a non-negative finite number"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": 0}, "top_k must be -1 (whole vocabulary) or >= 1, got 0"),
        ({"top_k": 2.0}, "top_k must be -1 (whole vocabulary) or >= 1, got 2.0"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids must be a list of integers"),
        ({"stop_token_ids": [3, 10, -1]}, "stop_token_ids [10, -1] are outside the vocabulary"),
        ({"ignore_eos": 1}, "ignore_eos must be a boolean, got 1"),
        ({"sampling_seed": -5}, "sampling_seed must be a non-negative integer, got -5"),
    ],
)
def test_bad_sampling_params_name_the_problem(raw: Any, message: str) -> None:
    with pytest.raises(BadRequest) as ei:
        parse_sampling(raw, VOCAB)
    assert message in str(ei.value)


def gen(**body: Any) -> Any:
    return parse_generate(body, vocab_size=VOCAB, max_positions=140)


def test_generate_body_parsed() -> None:
    r = gen(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4}, rid="r1")
    assert (r.rid, r.input_ids, r.sampling.max_new_tokens, r.return_logprob) == (
        "r1",
        [1, 2, 3],
        4,
        False,
    )
    r = gen(input_ids=[0], return_logprob=True, logprob_start_len=-1, top_logprobs_num=0)
    assert r.return_logprob and len(r.rid) == 32  # a fresh uuid hex when none is given
    # exactly the context: 12 input + 128 new tokens (the default) = max_positions
    assert gen(input_ids=[1] * 12).input_ids == [1] * 12


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": "hi", "bogus": 1}, "text prompts are not supported"),  # text is checked first
        ({"input_ids": [1], "bogus": 1}, "unknown request key(s) ['bogus']"),
        ({}, "input_ids is missing"),
        ({"input_ids": "1 2"}, "input_ids must be a list of integers, got str"),
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [[1], [2]]}, "batched input_ids (a list of lists) are not supported"),
        ({"input_ids": [1, True]}, "input_ids[1] = True is not an integer"),
        ({"input_ids": [1, 10]}, "input_ids[1] = 10 is outside the vocabulary [0, 10)"),
        (
            {"input_ids": [1, 10], "sampling_params": {"top_p": 2}},
            "input_ids[1] = 10",  # ids are checked before the sampling params
        ),
        ({"input_ids": [1], "sampling_params": {"top_p": 2}}, "top_p must be in (0, 1]"),
        (
            {"input_ids": [1] * 13},
            "maximum context length of 140 tokens: 13 input + 128 max_new_tokens = 141",
        ),
        ({"input_ids": [1], "return_logprob": 1}, "return_logprob must be a boolean, got 1"),
        ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len other than -1"),
        ({"input_ids": [1], "top_logprobs_num": 5}, "top_logprobs_num is not supported"),
        ({"input_ids": [1], "stream": True}, "stream=true is not supported by the CPU server"),
        ({"input_ids": [1], "rid": ""}, "rid must be a non-empty string, got ''"),
        ({"input_ids": [1], "rid": 7}, "rid must be a non-empty string, got 7"),
    ],
)
def test_bad_generate_bodies_name_the_problem(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as ei:
        gen(**body)
    assert message in str(ei.value)


def test_json_body() -> None:
    assert parse_json_object(b"  ") == {}
    assert parse_json_object(b'{"a": 1}', allow_empty=False) == {"a": 1}
    with pytest.raises(BadRequest, match="request body is empty; expected a JSON object"):
        parse_json_object(b"", allow_empty=False)
    with pytest.raises(BadRequest, match="request body is not valid JSON"):
        parse_json_object(b"{nope")
    with pytest.raises(BadRequest, match="request body must be a JSON object, got list"):
        parse_json_object(b"[1]")


def req(sampling: Sampling, seed: int | None = None) -> Req:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    fut: asyncio.Future[Req] = asyncio.get_running_loop().create_future()
    return Req("r", [1], sampling, True, gen, fut)


LOGITS = torch.tensor([[1.0, 2.0, 3.0]])


async def test_greedy_takes_the_argmax_and_reports_the_t1_logprob() -> None:
    tokens, lps = sample_rows(LOGITS, [req(Sampling(temperature=0.0))])
    # log_softmax([1, 2, 3])[2] = 3 - log(e + e^2 + e^3) = -0.4076059644
    assert tokens == [2] and lps[0] == pytest.approx(-0.4076059644, abs=1e-6)


async def test_logprob_is_of_the_full_distribution_before_top_k() -> None:
    tokens, lps = sample_rows(LOGITS, [req(Sampling(temperature=2.0, top_k=1), seed=0)])
    # top-k 1 leaves only token 2; its reported log-prob is unfiltered at T=2:
    # log_softmax([0.5, 1, 1.5])[2] = 1.5 - log(e^0.5 + e + e^1.5) = -0.6802696
    assert tokens == [2] and lps[0] == pytest.approx(-0.6802696, abs=1e-6)


async def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    # softmax([1, 2, 3]) = [0.090, 0.245, 0.665]: top_p 0.5 keeps {2}; top_p 0.7 keeps {1, 2}
    for seed in range(30):
        assert sample_rows(LOGITS, [req(Sampling(top_p=0.5), seed)])[0] == [2]
    picked = {sample_rows(LOGITS, [req(Sampling(top_p=0.7), s)])[0][0] for s in range(60)}
    assert picked == {1, 2}


async def test_a_seed_reproduces_whatever_else_is_in_the_batch() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    alone = sample_rows(logits[1:2], [req(Sampling(), seed=42)])
    batch = sample_rows(logits, [req(Sampling(), 7), req(Sampling(), 42), req(Sampling(), 9)])
    assert batch[0][1] == alone[0][0] and batch[1][1] == pytest.approx(alone[1][0])


async def test_response_spans_weight_versions() -> None:
    r = req(Sampling())
    r.output_ids, r.logprobs, r.versions = [4, 5, 6], [-1.0, -2.0, -3.0], ["0", "0", "1"]
    r.finish_reason, r.weight_version = {"type": "length", "length": 3}, "1"
    out = generate_response(r)
    meta = out["meta_info"]
    assert out["output_ids"] == [4, 5, 6]
    assert meta["weight_versions"] == [
        {"version": "0", "start": 0, "end": 2},
        {"version": "1", "start": 2, "end": 3},
    ]
    assert meta["output_token_logprobs"] == [[-1.0, 4, None], [-2.0, 5, None], [-3.0, 6, None]]
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (1, 3, "1")
